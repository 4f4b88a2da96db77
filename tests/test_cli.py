"""The `albireo` command on a tiny random model.

The main cases run the CLI for real, in subprocesses started together (each spends seconds
importing torch). Greedy runs must print exactly what the LLM API returns for the same prompt,
and bad input must end in exit status 2 with one `albireo: error:` line, never a traceback.
Further bad values go through the same main() in this process, which is much faster.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from albireo.entrypoints.cli import DEFAULT_MAX_TOKENS, main
from albireo.entrypoints.llm import LLM
from albireo.sampling_params import SamplingParams

MAX_TOKENS = "5"
PROMPT = "What is the capital of France?"
STDIN_PROMPTS = ["The quick brown fox", "Paged attention stores keys"]
MISSING_MODEL = "/nonexistent/albireo-model"
# For the in-process runs that build an engine: the default 1 GB KV cache takes half a second.
SMALL_KV = ["--cpu-kv-cache-gb", "0.01"]
CHAT_MAX_LEN = 40


def subprocess_runs(model: str) -> dict[str, tuple[list[str], str]]:
    """Name -> (CLI arguments, standard input)."""
    gen = ["generate", "--model", model, "--max-tokens", MAX_TOKENS]
    return {
        "generate": ([*gen, PROMPT], ""),
        # Two checks in one run, as each run costs seconds of imports: prompts come from standard
        # input (the blank line is skipped, not a third prompt) and are completed as raw text.
        "stdin-no-chat-template": ([*gen, "--no-chat-template"], "\n".join(STDIN_PROMPTS) + "\n\n"),
        "bad-temperature": ([*gen, PROMPT, "--temperature", "-1"], ""),
        "missing-model": (["generate", PROMPT, "--model", MISSING_MODEL], ""),
        # No --max-tokens: the default budget must fit itself to the room a short context leaves.
        "chat": (["chat", "--model", model, "--max-model-len", str(CHAT_MAX_LEN)], "hello\n/exit\n"),
    }


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    # A small KV cache: the default 1 GB takes half a second to build and changes no greedy output.
    return LLM(model, num_kv_blocks=64)


@pytest.fixture(scope="module")
def runs(model) -> dict[str, subprocess.CompletedProcess]:
    # Offline, so nothing can stall on the network; one thread each, as the runs share the cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(args: list[str], stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "albireo.entrypoints.cli", *args],
            input=stdin, capture_output=True, text=True, timeout=120, env=env, check=False,
        )

    cases = subprocess_runs(model)
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(run, *case) for name, case in cases.items()}
        return {name: future.result() for name, future in futures.items()}


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=int(MAX_TOKENS), temperature=0)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def assert_usage_error(returncode: int, stderr: str, *fragments: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("albireo: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_generate_with_chat_template(runs, llm):
    proc = runs["generate"]
    assert_ok(proc)
    [expected] = llm.chat([{"role": "user", "content": PROMPT}], greedy(), use_tqdm=False)
    assert expected.outputs[0].text.strip(), "the tiny model should say something in 5 greedy tokens"
    assert proc.stdout == expected.outputs[0].text + "\n"


def test_generate_prompts_from_stdin_without_chat_template(runs, llm):
    proc = runs["stdin-no-chat-template"]
    assert_ok(proc)
    outputs = llm.generate(STDIN_PROMPTS, greedy(), use_tqdm=False)
    assert proc.stdout == "".join(f"### {p}\n{o.outputs[0].text}\n" for p, o in zip(STDIN_PROMPTS, outputs))
    chatted = llm.chat([[{"role": "user", "content": p}] for p in STDIN_PROMPTS], greedy(), use_tqdm=False)
    assert [o.outputs[0].text for o in outputs] != [o.outputs[0].text for o in chatted], "the flag changes nothing"


def test_bad_sampling_value(runs):
    proc = runs["bad-temperature"]
    assert_usage_error(proc.returncode, proc.stderr, "temperature", "-1.0")
    assert proc.stdout == ""


def test_missing_model(runs):
    proc = runs["missing-model"]
    assert_usage_error(proc.returncode, proc.stderr, MISSING_MODEL, "does not exist")


def test_chat(runs, llm):
    proc = runs["chat"]
    assert_ok(proc)
    conversation = [{"role": "user", "content": "hello"}]
    room = CHAT_MAX_LEN - len(llm.engine.tokenize(llm.apply_chat_template(conversation), False))
    assert 0 < room < DEFAULT_MAX_TOKENS
    [expected] = llm.chat(conversation, SamplingParams(max_tokens=room, temperature=0), use_tqdm=False)
    assert expected.outputs[0].text.strip()
    # Not a terminal, so no "> " prompt: just the streamed reply and its newline.
    assert proc.stdout == expected.outputs[0].text + "\n"


# --- more bad input, through main() in this process ---------------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--temperature", "nan"], ["temperature", "nan"]),
        (["--top-p", "0"], ["top_p", "(0, 1]"]),
        (["--top-k", "-5"], ["top_k", "-5"]),
        (["--max-tokens", "0"], ["max_tokens", ">= 1"]),
        (["--max-model-len", "100000"], ["max_model_len 100000", "256"]),
        (["--max-model-len", "16", "--max-tokens", "1"], ["prompts[0]", "max_model_len is 16"]),
        (["--max-model-len", "32", "--max-tokens", "30"], ["prompts[0]", "max_tokens=30", "max_model_len is 32"]),
        (["--tokenizer", "/nonexistent/tokenizer"], ["tokenizer path /nonexistent/tokenizer", "does not exist"]),
        (["--block-size", "3"], ["block_size", "3"]),
    ],
    ids=["temperature-nan", "top-p", "top-k", "max-tokens", "max-model-len", "long-prompt", "no-room", "tokenizer",
         "block-size"],
)
def test_bad_values_in_process(model, args, fragments, capsys):
    argv = ["generate", "The quick brown fox jumps over the lazy dog.", "--model", model, *SMALL_KV, *args]
    code, err = run_main(argv, capsys)
    assert_usage_error(code, err, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(model, capsys):
    code, err = run_main(["generate", "hi", "--model", model, "--device", "cuda"], capsys)
    assert_usage_error(code, err, "device is cuda", "CUDA is not available")


def test_no_prompt(model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    code, err = run_main(["generate", "--model", model, *SMALL_KV], capsys)
    assert_usage_error(code, err, "no prompt")


def test_unparsable_argument(model, capsys):
    # argparse's own errors use the same status and prefix.
    code, err = run_main(["generate", "hi", "--model", model, "--max-tokens", "five"], capsys)
    assert code == 2 and "albireo generate: error: argument --max-tokens" in err


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "raw"])
def test_default_max_tokens_fits_a_short_context(model, llm, template, capsys):
    """Without --max-tokens, a short context shrinks the default budget instead of failing."""
    prompt, max_len = "The quick brown fox", 24
    argv = ["generate", prompt, "--model", model, "--max-model-len", str(max_len), *SMALL_KV]
    main(argv if template else [*argv, "--no-chat-template"])
    out = capsys.readouterr().out
    if template:
        conversation = [{"role": "user", "content": prompt}]
        room = max_len - len(llm.engine.tokenize(llm.apply_chat_template(conversation), False))
        [expected] = llm.chat(conversation, SamplingParams(max_tokens=room, temperature=0), use_tqdm=False)
    else:
        room = max_len - len(llm.engine.tokenize(prompt))
        [expected] = llm.generate(prompt, SamplingParams(max_tokens=room, temperature=0), use_tqdm=False)
    assert 0 < room < DEFAULT_MAX_TOKENS
    assert out == expected.outputs[0].text + "\n"
