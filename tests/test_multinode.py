"""Multi-node tensor parallelism on one machine: two groups of processes on loopback are the two nodes.

Node 0 is this test process (the engine, with rank 0's worker); node 1 is `albireo worker-node` in
a subprocess (with rank 1's worker), joined through MASTER_ADDR:MASTER_PORT on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from albireo import LLM, SamplingParams
from albireo.config import ParallelConfig, engine_config
from albireo.entrypoints.cli import main
from albireo.executor.executor import WorkerDiedError
from albireo.executor.node_relay import run_worker_node

from conftest import random_prompts
from processes import wait_gone

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# Engine arguments both nodes take (they must match): a small KV cache builds faster.
SMALL_KV_GB = "0.01"
# Far above a healthy run's few seconds: only a hang gets here.
HANG_S = 60


@contextmanager
def deadline(seconds: float):
    """Fail the test instead of hanging it: SIGALRM interrupts whatever the main thread waits on."""

    def expire(*_):
        raise TimeoutError(f"still waiting after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_port_pair() -> int:
    """A port p with p + 1 free too (torch.distributed's store, then the relay)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


def node_args(port: int) -> list[str]:
    return [
        "-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
        "--device", "cpu", "--cpu-kv-cache-gb", SMALL_KV_GB,
    ]


@contextmanager
def albireo(args: list[str], log: Path, **popen):
    """The `albireo` command in a subprocess, output to `log`; killed at the end if still there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "albireo.entrypoints.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
            **popen,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def worker_node(model: str, port: int, log: Path, *extra: str):
    return albireo(["worker-node", "--model", model, *node_args(port), "--node-rank", "1", *extra], log)


def node0(model: str, port: int) -> LLM:
    return LLM(
        model, tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=port,
        device="cpu", cpu_kv_cache_gb=float(SMALL_KV_GB),
    )


@contextmanager
def two_nodes(path: str, tmp_path: Path):
    """An engine on node 0 and `albireo worker-node` as node 1, under the hang deadline; yields
    (llm, node 1's process, node 1's log) and shuts the engine down however the test ends."""
    port = free_port_pair()
    log = tmp_path / "node1.log"
    with deadline(HANG_S), worker_node(path, port, log) as node1:
        llm = node0(path, port)
        try:
            yield llm, node1, log
        finally:
            llm.engine.shutdown()


def remote_worker_pid(log: Path) -> int:
    return int(re.search(r"worker rank 1: pid (\d+)", log.read_text()).group(1))


def test_two_nodes_greedy_equals_tp1_and_node1_exits_with_the_engine(tiny_model, tmp_path):
    path = tiny_model("llama")
    prompts = random_prompts(4, seed=4)
    expected = [o.outputs[0].token_ids for o in LLM(path).generate(prompts, GREEDY, use_tqdm=False)]
    with two_nodes(path, tmp_path) as (llm, node1, log):
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        llm.engine.shutdown()
        assert node1.wait(15) == 0, log.read_text()
        assert not wait_gone([remote_worker_pid(log)])
    assert got == expected


def test_a_killed_node_fails_the_engine_naming_it_and_leaves_no_process(tiny_model, tmp_path):
    with two_nodes(tiny_model("llama"), tmp_path) as (llm, node1, log):
        local = [p.pid for p in llm.engine.core.executor.workers.procs.values()]
        remote = remote_worker_pid(log)
        node1.send_signal(signal.SIGKILL)
        node1.wait()
        with pytest.raises(WorkerDiedError, match=r"node 1 .*disconnected"):
            llm.generate(random_prompts(2, seed=1), GREEDY, use_tqdm=False)
        # Node 1's worker notices its ring's writer is gone; node 0's were stopped by the engine.
        assert not wait_gone([remote, *local])


def test_a_killed_remote_worker_fails_the_engine_naming_its_rank(tiny_model, tmp_path):
    with two_nodes(tiny_model("llama"), tmp_path) as (llm, node1, log):
        os.kill(remote_worker_pid(log), signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="rank 1 on node 1 died"):
            llm.generate(random_prompts(2, seed=1), GREEDY, use_tqdm=False)
        assert node1.wait(15) == 1, log.read_text()


def test_node1_exits_when_the_engine_disappears(tiny_model, tmp_path):
    """Node 0 here is `albireo chat` in a subprocess, killed once it has answered."""
    path = tiny_model("llama")
    port = free_port_pair()
    chat = ["chat", "--model", path, *node_args(port), "--node-rank", "0", "--max-tokens", "2"]
    with (
        deadline(HANG_S),
        worker_node(path, port, tmp_path / "node1.log") as node1,
        albireo(chat, tmp_path / "node0.log", stdin=subprocess.PIPE, text=True) as engine,
    ):
        engine.stdin.write("hello\n")
        engine.stdin.flush()
        while not (tmp_path / "node0.log").read_text():  # the answer: the engine ran a request
            assert engine.poll() is None, "node 0 exited"
            time.sleep(0.1)
        engine.kill()
        assert node1.wait(15) == 1
        assert "lost node 0" in (tmp_path / "node1.log").read_text()
        assert not wait_gone([remote_worker_pid(tmp_path / "node1.log")])


def test_a_node_with_other_engine_arguments_is_refused(tiny_model):
    """Refused before any worker starts, so node 1 can be a thread of this process."""
    path = tiny_model("llama")
    port = free_port_pair()
    other = engine_config(
        path, tensor_parallel_size=2, nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=port,
        device="cpu", cpu_kv_cache_gb=float(SMALL_KV_GB), max_num_seqs=8,
    )
    refusals = []

    def node1() -> None:
        try:
            run_worker_node(other)
        except ValueError as e:
            refusals.append(str(e))

    thread = threading.Thread(target=node1)
    thread.start()
    with deadline(HANG_S), pytest.raises(ValueError, match=r"scheduler.max_num_seqs is 8 there and 256 on node 0"):
        node0(path, port)
    thread.join(HANG_S)
    assert refusals and refusals[0].startswith("node 0 refused this node"), refusals


# ---- configuration ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_one_node_or_the_environment(clean_env):
    p = ParallelConfig(tensor_parallel_size=2)
    assert (p.nnodes, p.node_rank, p.master_addr, p.master_port, p.ranks_per_node) == (1, 0, "127.0.0.1", 29500, 2)
    for name, value in (("NNODES", "2"), ("NODE_RANK", "1"), ("MASTER_ADDR", "10.0.0.7"), ("MASTER_PORT", "1234")):
        clean_env.setenv(name, value)
    p = ParallelConfig(tensor_parallel_size=4)
    assert (p.nnodes, p.node_rank, p.master_addr, p.master_port, p.ranks_per_node) == (2, 1, "10.0.0.7", 1234, 2)
    # An argument wins over its variable.
    assert ParallelConfig(tensor_parallel_size=4, node_rank=0, master_port=999).master_port == 999


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        (dict(tensor_parallel_size=3, nnodes=2), {}, r"tensor_parallel_size \(3\) must be a multiple of nnodes \(2\)"),
        (dict(tensor_parallel_size=2, nnodes=2, node_rank=2), {}, r"node_rank must be in \[0, 2\)"),
        (dict(tensor_parallel_size=2, nnodes=2, node_rank=-1), {}, r"node_rank must be in \[0, 2\)"),
        (dict(nnodes=0), {}, "nnodes must be >= 1"),
        (dict(master_port=65535), {}, r"master_port must be in \[1, 65534\]"),
        (dict(master_addr=""), {}, "master_addr must not be empty"),
        (dict(tensor_parallel_size=2), {"NNODES": "two"}, r"nnodes \(from NNODES='two'\) must be an integer"),
        (dict(tensor_parallel_size=2, nnodes=2), {"NODE_RANK": "3"}, r"node_rank \(from NODE_RANK='3'\) must be in"),
    ],
)
def test_bad_multinode_settings_are_refused_naming_them(clean_env, kwargs, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_only_node_0_runs_the_engine_and_only_the_others_run_worker_node(tiny_model, clean_env):
    path = tiny_model("llama")
    with pytest.raises(ValueError, match="the engine runs on node 0 only"):
        LLM(path, tensor_parallel_size=2, nnodes=2, node_rank=1, device="cpu")
    with pytest.raises(ValueError, match="node 0 runs the engine itself"):
        run_worker_node(engine_config(path, tensor_parallel_size=2, nnodes=2, node_rank=0, device="cpu"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["-tp", "3", "--nnodes", "2"], "tensor_parallel_size (3) must be a multiple of nnodes (2)"),
        (["-tp", "2", "--nnodes", "2", "--node-rank", "1"], "the engine runs on node 0 only"),
        (["--master-port", "65535"], "master_port must be in [1, 65534]"),
    ],
)
def test_cli_refuses_bad_multinode_flags_in_one_line(tiny_model, clean_env, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--model", tiny_model("llama"), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("albireo: error: ") and message in err, err
