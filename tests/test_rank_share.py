"""bench/rank_share.py writes one rank's share of a model at TP=t as a model config of its own."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "rank_share", Path(__file__).resolve().parents[1] / "bench" / "rank_share.py")
rank_share = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rank_share)

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 32}


def test_a_share_holds_a_rank_worth_of_heads_columns_and_vocabulary_at_full_width_and_depth():
    share = rank_share.rank_share(LLAMA_8B, 2)
    assert (share["num_attention_heads"], share["num_key_value_heads"]) == (16, 4)
    assert (share["intermediate_size"], share["vocab_size"]) == (7168, 64128)
    assert (share["hidden_size"], share["num_hidden_layers"], share["head_dim"]) == (4096, 32, 128)


def test_a_model_that_does_not_split_evenly_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads=8 does not split over 3 ranks"):
        rank_share.rank_share(dict(LLAMA_8B, num_attention_heads=48), 3)
