"""Which launch shape (DecodeTiles) the split-K decode kernel should use: a sweep over keys per
tile, warps and stages at the decode steps of W5 and W1 (llama-3.2-1b, ~1000 sequences), W2
(llama-3.1-8b at TP=1 and TP=2, 512 sequences) and W3 (batch 1, split over the context), timed in
CUDA graphs (as decode runs) and checked against the default shape's output.

    python bench/decode_attention.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albireo.bench.record import device_name, git_commit, graph_us  # noqa: E402
from albireo.kernels.triton_attention import DecodeTiles, paged_attention  # noqa: E402

# name: (query heads, KV heads, head dim, sequences, shortest and longest context)
SHAPES = {
    "W5 llama-3.2-1b": (32, 8, 64, 1024, 128, 640),
    "W1 llama-3.2-1b": (32, 8, 64, 1000, 1024, 1152),
    "W2 llama-3.1-8b TP1": (32, 8, 128, 512, 512, 768),
    "W2 llama-3.1-8b TP2": (16, 4, 128, 512, 512, 768),
    "W3 llama-3.1-8b TP1": (32, 8, 128, 1, 256, 256),
    "W3 llama-3.1-8b TP2": (16, 4, 128, 1, 256, 256),
}
PAGE = 16
CALLS = 4


def _sweep_shape(hq: int, hk: int, d: int, seqs: int, shortest: int, longest: int, configs: list[DecodeTiles]) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    seq_lens = torch.randint(shortest, longest + 1, (seqs,), device=dev, generator=gen, dtype=torch.int32)
    width = -(-2048 // PAGE)  # block tables as wide as max-model-len 2048 allows, like the engine's
    pages = seqs * width
    block_tables = torch.randperm(pages, device=dev, generator=gen).view(seqs, width).to(torch.int32)
    k_cache = torch.randn(pages, PAGE, hk, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(pages, PAGE, hk, d, device=dev, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(seqs, hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    starts = torch.arange(seqs + 1, device=dev, dtype=torch.int32)
    kv_bytes = 2 * int(seq_lens.sum()) * hk * d * 2
    out = torch.empty_like(q)

    def run(tiles: DecodeTiles) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables, starts, seq_lens, d**-0.5, 1, out=out, tiles=tiles)

    expected = run(configs[0]).float().clone()
    result = {"kv_bytes": kv_bytes, "configs": []}
    for tiles in configs:
        entry = {"tiles": vars(tiles)}
        try:
            diff = (run(tiles).float() - expected).abs().max().item()
            us = graph_us(lambda: [run(tiles) for _ in range(CALLS)], CALLS)
        except Exception as e:  # a shape that does not fit shared memory or registers
            entry["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        else:
            entry.update(us=us, tb_s=kv_bytes / us / 1e6, max_abs_diff=diff)
        result["configs"].append(entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configs = [DecodeTiles()] + [DecodeTiles(*c) for c in itertools.product((32, 64, 128), (2, 4, 8), (2, 3))]
    record = {"benchmark": "decode_attention", "device": device_name(), "commit": git_commit(),
              "torch": torch.__version__, "page": PAGE, "calls_per_graph": CALLS, "shapes": {}}
    for name, shape in SHAPES.items():
        res = _sweep_shape(*shape, configs)
        record["shapes"][name] = {"shape": dict(zip(("hq", "hk", "d", "seqs", "shortest", "longest"), shape)), **res}
        print(f"{name}: default {res['configs'][0].get('us', float('nan')):.1f} us", flush=True)
        for entry in sorted(res["configs"], key=lambda e: e.get("us", float("inf")))[:5]:
            t = entry["tiles"]
            label = f"kv {t['kv_tile']:3d} warps {t['warps']} stages {t['stages']}"
            if "error" in entry:
                print(f"  {label}: {entry['error']}")
            else:
                print(f"  {label}: {entry['us']:8.1f} us {entry['tb_s']:5.2f} TB/s (max diff {entry['max_abs_diff']:.1e})")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
