"""Which launch shape (PrefillTiles) the mixed attention kernel should use for whole-prompt
prefill: a sweep over rows per program, keys per tile, warps and stages at the prefill steps of
W1 (llama-3.2-1b, 16 x 1024 tokens) and W2 (llama-3.1-8b at TP=1 and TP=2, 32 x 512), with torch's
SDPA (flash) on the same tokens, unpaged, as the yardstick. Each config is checked against SDPA.

    python bench/prefill_attention.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit  # noqa: E402
from albireo.kernels.triton_attention import PrefillTiles, paged_attention  # noqa: E402

# name: (query heads, KV heads, head dim, prompts, prompt length)
SHAPES = {
    "W1 llama-3.2-1b": (32, 8, 64, 16, 1024),
    "W2 llama-3.1-8b TP1": (32, 8, 128, 32, 512),
    "W2 llama-3.1-8b TP2": (16, 4, 128, 32, 512),
}
PAGE = 16


def _events_ms(fn, calls: int = 10, reps: int = 5) -> float:
    """Median over reps of the mean time of `calls` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _sweep_shape(hq: int, hk: int, d: int, prompts: int, length: int, configs: list[PrefillTiles]) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens = prompts * length
    q = torch.randn(tokens, hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(tokens, hk, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(tokens, hk, d, device=dev, dtype=torch.bfloat16, generator=gen)
    # The cache holds every prompt's K/V in shuffled pages, as a running engine's would be.
    pages = tokens // PAGE
    order = torch.randperm(pages, device=dev, generator=gen)
    k_cache = torch.empty(pages, PAGE, hk, d, device=dev, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    k_cache[order] = k.view(pages, PAGE, hk, d)
    v_cache[order] = v.view(pages, PAGE, hk, d)
    block_tables = order.view(prompts, length // PAGE).to(torch.int32)
    starts = torch.arange(0, tokens + 1, length, device=dev, dtype=torch.int32)
    seq_lens = torch.full((prompts,), length, device=dev, dtype=torch.int32)
    scale = d**-0.5

    def sdpa() -> torch.Tensor:
        qs = q.view(prompts, length, hq, d).transpose(1, 2)
        ks = k.view(prompts, length, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
        vs = v.view(prompts, length, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(1, 2)

    expected = sdpa().reshape(tokens, hq, d).float()
    flops = 4 * d * hq * prompts * length * (length + 1) / 2
    result = {"sdpa_ms": _events_ms(sdpa), "configs": []}
    result["sdpa_tflops"] = flops / result["sdpa_ms"] / 1e9
    for tiles in configs:
        def ours() -> torch.Tensor:
            return paged_attention(q, k_cache, v_cache, block_tables, starts, seq_lens, scale, length, tiles=tiles)

        entry = {"tiles": vars(tiles)}
        try:
            err = (ours().float() - expected).abs().max().item()
            ms = _events_ms(ours)
        except Exception as e:  # a shape that does not fit shared memory or registers
            entry["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            entry.update(ms=ms, tflops=flops / ms / 1e9, max_abs_diff=err)
        result["configs"].append(entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configs = [PrefillTiles()] + [
        PrefillTiles(rows, kv_tile, warps, stages)
        for rows, kv_tile, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    ]
    record = {"benchmark": "prefill_attention", "device": device_name(), "commit": git_commit(),
              "torch": torch.__version__, "page": PAGE, "shapes": {}}
    for name, shape in SHAPES.items():
        res = _sweep_shape(*shape, configs)
        record["shapes"][name] = {"shape": dict(zip(("hq", "hk", "d", "prompts", "length"), shape)), **res}
        print(f"{name}: sdpa {res['sdpa_ms']:.3f} ms ({res['sdpa_tflops']:.0f} TFLOP/s)", flush=True)
        for entry in sorted(res["configs"], key=lambda e: e.get("ms", float("inf"))):
            t = entry["tiles"]
            label = f"rows {t['rows']:3d} kv {t['kv_tile']:3d} warps {t['warps']} stages {t['stages']}"
            if "error" in entry:
                print(f"  {label}: {entry['error']}")
            else:
                print(f"  {label}: {entry['ms']:.3f} ms {entry['tflops']:5.0f} TFLOP/s (max diff {entry['max_abs_diff']:.1e})")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
