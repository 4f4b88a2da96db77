"""Can a decode step's attention and its matmuls share one GPU? A decode layer of llama-3.1-8b's
shapes (a TP=t rank's share: 32/t query heads, 8/t KV heads, 14336/t MLP columns), W2's decode
contexts (512-768 keys), R rows, on one GPU, times per layer:

    whole:      qkv -> attention -> o_proj -> norm -> gate_up -> silu -> down -> norm, R rows
    halves:     the batch in two halves of R/2 rows; each phase runs one half's attention and the
                other half's matmuls from its o_proj to its next layer's qkv, in a row on one stream
    2 streams:  the same phases with the attention on a second stream: attention reads the KV cache
                (HBM-bound) while the matmuls mostly compute, so the two could run at once
    priorities: 2 streams, one of them of a higher priority, so that its kernels' programs start
                as soon as SMs free up rather than after every program of the kernel ahead
    carveout c: matmuls first, with cuBLAS (or cuBLASLt) asked to leave c SMs free
                (torch._C._set_sm_carveout_experimental), so that attention's programs find SMs
    green n:    2 streams, the attention stream in a CUDA green context of n SMs (where torch
                supports them)

Phases end in a join (each stream waits for the other), the dependencies of a real step: a half's
matmuls need its attention, and its next attention needs its qkv. Timed eagerly (green contexts
are not captured in graphs) behind a sleeping kernel, so that the host's launches stay ahead;
`whole` is also timed in a CUDA graph as a check of that. The values are not checked: timing only.
    python bench/decode_overlap.py [--tp 2] [--rows 512] [--carveouts 32 66] [--green 48 66] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit, graph_us

LAYERS = 4
REPEATS = 5
HIDDEN, INTER = 4096, 14336
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE = 16
SHORTEST, LONGEST = 512, 768
EPS = 1e-5


def eager_us(fn, calls: int) -> float:
    """Microseconds per call of fn (which makes `calls` calls), launched behind a sleeping kernel
    long enough for the host to queue all REPEATS runs before the GPU reaches them."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s
    start.record()
    for _ in range(REPEATS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPEATS * calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[512])
    p.add_argument("--carveouts", type=int, nargs="+", default=[32, 66])
    p.add_argument("--green", type=int, nargs="*", default=[])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from albireo.kernels.triton_attention import paged_attention
    from albireo.kernels.triton_fused import rms_norm, silu_and_mul

    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(0)
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    q_heads, kv_heads, inter = Q_HEADS // args.tp, KV_HEADS // args.tp, INTER // args.tp
    qkv_width = (q_heads + 2 * kv_heads) * HEAD_DIM

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, **bf16) * scale

    layers = [{"qkv": randn(qkv_width, HIDDEN, scale=0.02), "o": randn(HIDDEN, q_heads * HEAD_DIM, scale=0.02),
               "gate_up": randn(2 * inter, HIDDEN, scale=0.02), "down": randn(HIDDEN, inter, scale=0.02)}
              for _ in range(LAYERS)]
    norm_w = torch.ones(HIDDEN, **bf16)
    side = torch.cuda.Stream(device=dev)
    # The block scheduler starts a kernel's programs only once the kernels ahead of it have all of
    # theirs running, unless its stream has the higher priority.
    high, low = torch.cuda.Stream(device=dev, priority=-1), torch.cuda.Stream(device=dev, priority=0)
    greens = {}
    for n in args.green:
        try:
            from torch.cuda.green_contexts import GreenContext

            greens[n] = GreenContext.create(num_sms=n, device_id=0).Stream()
        except Exception as e:  # report what this torch or driver lacks, and go on
            print(f"green context of {n} SMs: {type(e).__name__}: {e}", flush=True)

    record = {"benchmark": "decode_overlap", "device": device_name(), "commit": git_commit(), "tp_share": args.tp,
              "layers_per_run": LAYERS, "unit": "us per layer", "results": {}}
    for rows in args.rows:
        half = rows // 2
        width = -(-LONGEST // PAGE)
        tables = torch.randperm(rows * width, device=dev, generator=gen).view(rows, width).to(torch.int32)
        k_cache, v_cache = (randn(rows * width, PAGE, kv_heads, HEAD_DIM) for _ in range(2))
        lens = torch.randint(SHORTEST, LONGEST + 1, (rows,), device=dev, generator=gen, dtype=torch.int32)
        starts = torch.arange(rows + 1, device=dev, dtype=torch.int32)
        qkv = randn(rows, qkv_width)
        attn = torch.empty(rows, q_heads * HEAD_DIM, **bf16)
        residual = randn(rows, HIDDEN)
        halves = (slice(0, half), slice(half, rows))

        def attention(s: slice) -> None:
            q = qkv[s, : q_heads * HEAD_DIM].view(-1, q_heads, HEAD_DIM)
            paged_attention(q, k_cache, v_cache, tables[s], starts[: s.stop - s.start + 1], lens[s], HEAD_DIM**-0.5,
                            1, out=attn[s])

        def matmuls(s: slice, w: dict[str, torch.Tensor], w_next: dict[str, torch.Tensor]) -> None:
            """A half's work from its o_proj to its next layer's qkv (written where attention reads it)."""
            residual[s].add_(attn[s] @ w["o"].t())
            h = rms_norm(residual[s], norm_w, EPS)
            m = silu_and_mul(h @ w["gate_up"].t())
            h, _ = rms_norm(m @ w["down"].t(), norm_w, EPS, residual[s])
            torch.matmul(h, w_next["qkv"].t(), out=qkv[s])

        def whole() -> None:
            everything = slice(0, rows)
            for i, w in enumerate(layers):
                attention(everything)
                matmuls(everything, w, layers[(i + 1) % LAYERS])

        def phased(attention_stream: torch.cuda.Stream | None, matmul_stream: torch.cuda.Stream | None = None) -> None:
            """Per layer two phases: one half's attention with the other half's matmuls."""
            main = torch.cuda.current_stream()
            for i, w in enumerate(layers):
                for h in (0, 1):
                    for stream in (attention_stream, matmul_stream):
                        if stream is not None:
                            stream.wait_stream(main)
                    with torch.cuda.stream(attention_stream or main):
                        attention(halves[h])
                    # The other half's attention ran in the phase before: half 1's in the previous
                    # layer's second phase, half 0's in this layer's first.
                    with torch.cuda.stream(matmul_stream or main):
                        if h == 0:
                            matmuls(halves[1], layers[i - 1], w)
                        else:
                            matmuls(halves[0], w, layers[(i + 1) % LAYERS])
                    for stream in (attention_stream, matmul_stream):
                        if stream is not None:
                            main.wait_stream(stream)

        times = {
            "whole": eager_us(whole, LAYERS),
            "whole (graph)": graph_us(whole, LAYERS),
            "halves": eager_us(lambda: phased(None), LAYERS),
            "2 streams": eager_us(lambda: phased(side), LAYERS),
            "2 streams, matmuls first": eager_us(lambda: phased(low, high), LAYERS),
            "2 streams, attention first": eager_us(lambda: phased(high, low), LAYERS),
            "attention R": eager_us(lambda: [attention(slice(0, rows)) for _ in layers], LAYERS),
            "attention R/2": eager_us(lambda: [attention(halves[0]) for _ in layers], LAYERS),
            "matmuls R/2": eager_us(lambda: [matmuls(halves[0], w, w) for w in layers], LAYERS),
        }
        for library in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(library)
            for c in args.carveouts:
                torch._C._set_sm_carveout_experimental(c)
                times[f"matmuls R/2 {library} carveout {c}"] = eager_us(lambda: [matmuls(halves[0], w, w) for w in layers],
                                                                        LAYERS)
                times[f"{library} carveout {c}, matmuls first"] = eager_us(lambda: phased(low, high), LAYERS)
                torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library("cublas")
        for n, stream in greens.items():
            try:
                with torch.cuda.stream(stream):
                    times[f"attention R/2 green {n}"] = eager_us(lambda: [attention(halves[0]) for _ in layers],
                                                                 LAYERS)
                times[f"green {n}"] = eager_us(lambda s=stream: phased(s), LAYERS)
            except Exception as e:
                times[f"green {n} error"] = f"{type(e).__name__}: {e}"
        record["results"][f"R={rows}"] = times
        print(f"R={rows} " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in times.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
