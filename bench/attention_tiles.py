"""Which launch shapes the paged-attention kernels should use, swept in CUDA graphs on one GPU:

* prefill: PrefillTiles (rows per program, keys per tile, warps, stages) on the mixed path at the
  whole-prompt prefill steps of W1 (llama-3.2-1b, 16 x 1024 tokens) and W2 (llama-3.1-8b at TP=1
  and TP=2, 32 x 512), with torch's SDPA (flash) on the same tokens, unpaged, as the yardstick and
  the reference output;
* decode: DecodeTiles (keys per tile, warps, stages) on the split-K decode path at the decode steps
  of W5 and W1 (~1000 sequences), W2 (512, with spread and with even contexts) and W3 (batch 1,
  split over its context), checked against the first config's output;
* splits: the same decode steps at 1 to 4 KV splits per sequence and at the default count;
* batch1: batch-1 decode at 128 to 2048 keys at 1 to 16 splits (the default count is 16).

    python bench/attention_tiles.py [prefill] [decode] [splits] [batch1] [--shapes NAME_PART]
        [--kv-cache-dtype auto|fp8|fp8_e4m3|fp8_e5m2] [--out FILE.json]

(benchmarks/results/prefill-attention-* and decode-attention-* were written by its two halves
when they were separate scripts.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit, graph_us
from albireo.config import KV_CACHE_DTYPES
from albireo.kernels.triton_attention import (
    SPLIT_DECODE_TILES,
    DecodeTiles,
    PrefillTiles,
    decode_tiles,
    default_num_splits,
    paged_attention,
    prefill_tiles,
)

# name: (query heads, KV heads, head dim, prompts, prompt length)
PREFILL_SHAPES = {
    "W1 llama-3.2-1b": (32, 8, 64, 16, 1024),
    "W2 llama-3.1-8b TP1": (32, 8, 128, 32, 512),
    "W2 llama-3.1-8b TP2": (16, 4, 128, 32, 512),
}
# name: (query heads, KV heads, head dim, sequences, shortest and longest context)
DECODE_SHAPES = {
    "W5 llama-3.2-1b": (32, 8, 64, 1024, 128, 640),
    "W1 llama-3.2-1b": (32, 8, 64, 1000, 1024, 1152),
    "W2 llama-3.1-8b TP1": (32, 8, 128, 512, 512, 768),
    "W2 llama-3.1-8b TP2": (16, 4, 128, 512, 512, 768),
    # W2's running sequences entered within a few steps of each other: their contexts are close.
    "W2 llama-3.1-8b TP1, even contexts": (32, 8, 128, 512, 640, 640),
    "W2 llama-3.1-8b TP2, even contexts": (16, 4, 128, 512, 640, 640),
    "W3 llama-3.1-8b TP1": (32, 8, 128, 1, 256, 256),
    "W3 llama-3.1-8b TP2": (16, 4, 128, 1, 256, 256),
}
PREFILL_CONFIGS = [PrefillTiles()] + [PrefillTiles(*c) for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
DECODE_CONFIGS = [DecodeTiles()] + [DecodeTiles(*c) for c in itertools.product((32, 64, 128), (2, 4, 8), (2, 3))]
PAGE = 16
CALLS = 4
# The KV cache's dtype (--kv-cache-dtype, the engine's names); queries stay bf16.
kv_dtype = torch.bfloat16


def _sweep(configs: list, run: Callable, expected: torch.Tensor, work: float) -> list[dict]:
    """Per config: us per call, work per us / 1e6 (TFLOP/s or TB/s) and the largest difference
    from `expected`; or the error of a shape that does not fit shared memory or registers."""
    entries = []
    for tiles in configs:
        entry = {"tiles": vars(tiles)}
        try:
            diff = (run(tiles).float() - expected).abs().max().item()
            us = graph_us(lambda: [run(tiles) for _ in range(CALLS)], CALLS)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            entry.update(us=us, rate=work / us / 1e6, max_abs_diff=diff)
        entries.append(entry)
    return entries


def _cache(tokens_per_seq: int, seqs: int, hk: int, d: int, gen: torch.Generator):
    """Random K/V caches of seqs x tokens_per_seq positions in shuffled pages, and block tables."""
    dev = torch.device("cuda")
    width = -(-tokens_per_seq // PAGE)
    pages = seqs * width
    block_tables = torch.randperm(pages, device=dev, generator=gen).view(seqs, width).to(torch.int32)
    k_cache = torch.randn(pages, PAGE, hk, d, device=dev, dtype=torch.bfloat16, generator=gen).to(kv_dtype)
    v_cache = torch.randn(pages, PAGE, hk, d, device=dev, dtype=torch.bfloat16, generator=gen).to(kv_dtype)
    return k_cache, v_cache, block_tables


def sweep_prefill(hq: int, hk: int, d: int, prompts: int, length: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache, v_cache, block_tables = _cache(length, prompts, hk, d, gen)
    q = torch.randn(prompts * length, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    # The same K/V unpaged, prompt by prompt, for SDPA.
    k, v = (cache[block_tables.flatten().long()].view(prompts, length, hk, d).transpose(1, 2)
            .repeat_interleave(hq // hk, dim=1) for cache in (k_cache, v_cache))
    starts = torch.arange(0, prompts * length + 1, length, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((prompts,), length, device="cuda", dtype=torch.int32)

    def sdpa() -> torch.Tensor:
        qs = q.view(prompts, length, hq, d).transpose(1, 2)
        return F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=d**-0.5).transpose(1, 2)

    def run(tiles: PrefillTiles) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables, starts, seq_lens, d**-0.5, length, tiles=tiles)

    flops = 4 * d * hq * prompts * length * (length + 1) / 2
    sdpa_us = graph_us(lambda: [sdpa() for _ in range(CALLS)], CALLS)
    expected = sdpa().reshape(prompts * length, hq, d).float()
    return {"sdpa_us": sdpa_us, "sdpa_rate": flops / sdpa_us / 1e6, "unit": "TFLOP/s",
            "configs": _sweep([prefill_tiles(d)] + PREFILL_CONFIGS, run, expected, flops)}


def _decode_inputs(hq: int, hk: int, d: int, seqs: int, shortest: int, longest: int):
    """A decode step's q, paged caches, block tables (as wide as max-model-len 2048 allows, like the
    engine's), query starts and lengths, and the KV bytes it reads."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache, v_cache, block_tables = _cache(2048, seqs, hk, d, gen)
    seq_lens = torch.randint(shortest, longest + 1, (seqs,), device="cuda", generator=gen, dtype=torch.int32)
    q = torch.randn(seqs, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    starts = torch.arange(seqs + 1, device="cuda", dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, starts, seq_lens, 2 * int(seq_lens.sum()) * hk * d * k_cache.element_size()


def sweep_decode(hq: int, hk: int, d: int, seqs: int, shortest: int, longest: int) -> dict:
    q, k_cache, v_cache, block_tables, starts, seq_lens, kv_bytes = _decode_inputs(hq, hk, d, seqs, shortest, longest)
    out = torch.empty_like(q)

    def run(tiles: DecodeTiles) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables, starts, seq_lens, d**-0.5, 1, out=out, tiles=tiles)

    configs = [decode_tiles(d)] + DECODE_CONFIGS  # the engine's choice first
    expected = run(configs[0]).float().clone()
    return {"unit": "TB/s", "configs": _sweep(configs, run, expected, kv_bytes)}


@dataclass(frozen=True)
class Splits:
    """A decode launch by KV split count; kv_tile None: the tiles that count gets by default."""

    num_splits: int
    kv_tile: int | None = None


def sweep_splits(hq: int, hk: int, d: int, seqs: int, shortest: int, longest: int,
                 counts: tuple[int, ...] = (1, 2, 3, 4)) -> dict:
    """The decode path at `counts` KV splits per sequence and at the default count (from the batch
    and the block table's width), with the tiles each count gets by default, and split counts also
    with the unsplit path's tiles where those differ."""
    q, k_cache, v_cache, block_tables, starts, seq_lens, kv_bytes = _decode_inputs(hq, hk, d, seqs, shortest, longest)
    default = default_num_splits(seqs, hk, 2048, q.device)

    def run(c: Splits) -> torch.Tensor:
        tiles = None if c.kv_tile is None else DecodeTiles(kv_tile=c.kv_tile)
        return paged_attention(q, k_cache, v_cache, block_tables, starts, seq_lens, d**-0.5, 1,
                               num_splits=c.num_splits, tiles=tiles)

    split_counts = sorted({*counts, default})
    unsplit_tile = decode_tiles(d).kv_tile
    configs = [Splits(n) for n in split_counts]
    if unsplit_tile != SPLIT_DECODE_TILES.kv_tile:
        configs += [Splits(n, unsplit_tile) for n in split_counts if n > 1]
    return {"unit": "TB/s", "default_splits": default,
            "configs": _sweep(configs, run, run(Splits(1)).float(), kv_bytes)}


# Batch-1 decode (W3) at the contexts a request passes through, TP=1 and TP=2 heads of Llama-3.1-8B.
BATCH_1_SHAPES = {f"batch 1 {hq}/{hk} heads, {n} keys": (hq, hk, 128, 1, n, n)
                  for hq, hk in ((32, 8), (16, 4)) for n in (128, 256, 384, 512, 1024, 2048)}


def sweep_batch_1_splits(*shape: int) -> dict:
    return sweep_splits(*shape, counts=(1, 2, 3, 4, 6, 8, 12, 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="prefill, decode, splits, batch1; prefill and decode when "
                        "none is named")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default="", help="only the shapes whose name contains this")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    args = parser.parse_args()
    global kv_dtype
    kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or torch.bfloat16
    if set(args.paths) - {"prefill", "decode", "splits", "batch1"}:
        parser.error(f"paths are prefill, decode, splits and batch1, not {' '.join(args.paths)}")
    record = {"benchmark": "attention_tiles", "device": device_name(), "commit": git_commit(),
              "torch": torch.__version__, "page": PAGE, "calls_per_graph": CALLS, "kv_cache_dtype": args.kv_cache_dtype}
    for path in args.paths or ["prefill", "decode"]:
        shapes, sweep = {"prefill": (PREFILL_SHAPES, sweep_prefill), "decode": (DECODE_SHAPES, sweep_decode),
                         "splits": (DECODE_SHAPES, sweep_splits),
                         "batch1": (BATCH_1_SHAPES, sweep_batch_1_splits)}[path]
        record[path] = {}
        for name, shape in shapes.items():
            if args.shapes not in name:
                continue
            res = record[path][name] = {"shape": shape, **sweep(*shape)}
            unit = res["unit"]
            yardstick = f", SDPA {res['sdpa_us']:.1f} us ({res['sdpa_rate']:.2f} {unit})" if "sdpa_us" in res else ""
            default = res["configs"][0]
            if "default_splits" in res:
                default = next(e for e in res["configs"] if e["tiles"] == vars(Splits(res["default_splits"])))
                yardstick += f" ({res['default_splits']} splits)"
            print(f"{path} {name}: default {default.get('us', float('nan')):.1f} us{yardstick}", flush=True)
            for entry in sorted(res["configs"], key=lambda e: e.get("us", float("inf")))[:5]:
                label = " ".join(f"{k} {v}" for k, v in entry["tiles"].items())
                if "error" in entry:
                    print(f"  {label}: {entry['error']}")
                else:
                    print(f"  {label}: {entry['us']:8.1f} us {entry['rate']:6.2f} {unit} (max diff {entry['max_abs_diff']:.1e})")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
