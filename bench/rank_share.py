"""Write the config of one rank's share of a model at TP=t as a model of its own.

A rank of TP=t holds 1/t of the attention heads, KV heads, MLP columns and vocabulary. Run on one
GPU with dummy weights, that share times what a rank computes without the all-reduces between
ranks, so a TP=t run's time minus the share's is what the ranks' exchanges cost. Measured on a card
that was not lent as a pair (the H100), the share's time plus that cost from a pair of other cards
with the same NVLink projects the pair's run:
    python bench/rank_share.py benchmarks/models/llama-3.1-8b 2 OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPLIT = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")


def rank_share(config: dict, tp: int) -> dict:
    for key in SPLIT:
        if config[key] % tp:
            raise ValueError(f"{key}={config[key]} does not split over {tp} ranks")
    share = dict(config, **{key: config[key] // tp for key in SPLIT})
    # head_dim is hidden_size / num_attention_heads unless written down: keep the whole model's.
    share["head_dim"] = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("tp", type=int)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args()
    config = json.loads((args.model_dir / "config.json").read_text())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "config.json").write_text(json.dumps(rank_share(config, args.tp), indent=2))


if __name__ == "__main__":
    main()
