"""The `albireo` command: generate, chat, serve, bench, and worker-node (the other nodes of a multi-node run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from albireo.sampling_params import SamplingParams

if TYPE_CHECKING:
    from albireo.entrypoints.llm import LLM

# The output budget when --max-tokens is not given, cut to the room the prompt leaves: a default
# the user never typed must not make a prompt fail on a model with a short context.
DEFAULT_MAX_TOKENS = 256


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory, when not the model's")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="plan each step only after the previous one finished (for A/B runs)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--cpu-kv-cache-gb", type=float, default=1.0)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV pool's size instead of sizing it")
    g.add_argument("--kv-offload-gb", "--cpu-offload-gb", dest="kv_offload_gb", type=float, default=0.0,
                   help="GiB of host memory per rank for a second tier of KV blocks (0: off)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="the KV cache's element type: the model's (auto), or float8 (twice the blocks, half "
                   "the bytes read; lossy, no scaling factors)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--tp-sampling", default="seq_parallel", choices=["seq_parallel", "all_gather"],
                   help="under TP: each rank samples a slice of the rows, or every rank samples all of them")
    g.add_argument("--all-reduce", default="symm_mem", choices=["symm_mem", "nccl"],
                   help="under TP on GPUs: small all-reduces over peer memory (NCCL for the rest), or NCCL only")
    g.add_argument("--nnodes", type=int, default=None,
                   help="nodes the TP ranks are split over (default: $NNODES, else 1)")
    g.add_argument("--node-rank", type=int, default=None,
                   help="this node: 0 runs the engine, 1 .. nnodes-1 run `albireo worker-node` "
                   "(default: $NODE_RANK, else 0)")
    g.add_argument("--master-addr", default=None,
                   help="node 0's address, for torch.distributed and the relay (default: $MASTER_ADDR, else 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None,
                   help="torch.distributed's port on node 0; the relay takes the next one "
                   "(default: $MASTER_PORT, else 29500)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: run every step eagerly")
    g.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="torch instead of the fused Triton norm/RoPE/activation kernels")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=None,
        help=f"default: {DEFAULT_MAX_TOKENS}, or fewer where the prompt leaves less room in the context",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def engine_args(args: argparse.Namespace) -> dict:
    """The engine flags as albireo.config.engine_config's keyword arguments: each of its parameters
    that the parsed arguments hold (the rest keep engine_config's defaults)."""
    import inspect

    from albireo.config import engine_config

    return {name: getattr(args, name) for name in inspect.signature(engine_config).parameters if hasattr(args, name)}


def build_llm(args: argparse.Namespace):
    from albireo.entrypoints.llm import LLM

    return LLM(**engine_args(args))


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
    )


def fit_default_max_tokens(
    args: argparse.Namespace, llm: LLM, params: SamplingParams, prompt: str, add_special_tokens: bool
) -> SamplingParams:
    """params for one prompt: without --max-tokens, the default budget cut to the context's room."""
    if args.max_tokens is not None:
        return params
    room = llm.engine.max_model_len - len(llm.engine.tokenize(prompt, add_special_tokens))
    # With no room at all the prompt itself is too long; validation says so, naming the prompt.
    return replace(params, max_tokens=max(1, min(params.max_tokens, room)))


def cmd_generate(args: argparse.Namespace) -> None:
    params = sampling_from_args(args)
    llm = build_llm(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass one as an argument or on standard input")
    use_template = not args.no_chat_template and bool(getattr(llm.get_tokenizer(), "chat_template", None))
    if use_template:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        # Rendered here only to count tokens; the template spells out the special tokens itself.
        per_prompt = [
            fit_default_max_tokens(args, llm, params, llm.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]
        outputs = llm.chat(conversations, per_prompt, use_tqdm=len(prompts) > 1)
    else:
        per_prompt = [fit_default_max_tokens(args, llm, params, p, add_special_tokens=True) for p in prompts]
        outputs = llm.generate(prompts, per_prompt, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text)


def cmd_chat(args: argparse.Namespace) -> None:
    params = sampling_from_args(args)
    llm = build_llm(args)
    engine = llm.engine
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        prompt = llm.apply_chat_template(messages)
        request_id = engine.new_request_id()
        turn_params = fit_default_max_tokens(args, llm, params, prompt, add_special_tokens=False)
        engine.add_request(request_id, prompt, turn_params, add_special_tokens=False)
        printed = 0
        reply = None
        while reply is None or not reply.finished:
            for out in engine.step():
                if out.request_id == request_id:
                    reply = out
                    text = out.outputs[0].text
                    print(text[printed:], end="", flush=True)
                    printed = len(text)
        print()
        messages.append({"role": "assistant", "content": reply.outputs[0].text})


def cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from albireo.bench import amdahl, latency, multiturn, throughput
    from albireo.bench.record import write_record

    module = {"throughput": throughput, "latency": latency, "amdahl": amdahl, "multiturn": multiturn}[args.bench]
    path = Path(args.model or "smollm2-135m.gguf")
    args.model_name = args.model_name or (path.stem if path.suffix == ".gguf" else path.name)
    record = module.run(args, lambda: build_llm(args))
    print(f"record: {write_record(record, args.out_dir)}")


def cmd_serve(args: argparse.Namespace) -> None:
    from albireo.entrypoints.openai.server import run_server

    if args.model_tag is not None:
        args.model = args.model_tag
    run_server(args)


def cmd_worker_node(args: argparse.Namespace) -> None:
    import logging
    import signal

    from albireo.config import engine_config
    from albireo.executor.node_relay import NodeStopped, run_worker_node

    logging.basicConfig(level=logging.INFO, format="albireo worker-node: %(message)s")
    # A job scheduler stops with SIGTERM: leave as Ctrl-C does, stopping the workers on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run_worker_node(engine_config(**engine_args(args)))
    except NodeStopped as e:
        print(f"albireo worker-node: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="albireo", description="Albireo LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one or more prompts and print the text")
    gen.add_argument("prompt", nargs="*", help="prompt text (default: one prompt per line of standard input)")
    gen.add_argument("--no-chat-template", action="store_true", help="complete the raw text instead of chatting")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streamed to the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="same as --model")
    from albireo.entrypoints.openai.args import add_serve_args

    add_serve_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    node = sub.add_parser(
        "worker-node",
        help="host the TP ranks of node 1 .. nnodes-1 of a multi-node run (node 0 runs serve/generate/chat)",
        description="Start this node's TP workers and relay node 0's commands to them, until node 0 shuts down. "
        "Pass the same engine arguments as node 0, with this node's --node-rank.",
    )
    add_engine_args(node)
    node.set_defaults(func=cmd_worker_node, skip_tokenizer_init=True)

    bench = sub.add_parser("bench", help="benchmarks that write JSON records to benchmarks/results/")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from albireo.bench import amdahl, latency, multiturn, throughput

    for name, module, text in (
        ("throughput", throughput, "offline throughput on random-token prompts (dummy weights welcome)"),
        ("latency", latency, "end-to-end latency of one batch"),
        ("amdahl", amdahl, "per-step breakdown, serial fraction and best TP degree, async on and off"),
        ("multiturn", multiturn, "multi-turn chat on a small KV pool: host KV tier vs recompute (TTFT)"),
    ):
        p = bench_sub.add_parser(name, help=text)
        module.add_args(p)
        p.add_argument("--model-name", default=None, help="the shape's name in the record (default: the model path's)")
        add_engine_args(p)
        p.set_defaults(func=cmd_bench, skip_tokenizer_init=True)
    from albireo.bench import serve as bench_serve

    p = bench_sub.add_parser("serve", help="online serving (Poisson arrivals) against an OpenAI-compatible URL")
    bench_serve.add_args(p)
    p.set_defaults(func=bench_serve.main)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"albireo: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
