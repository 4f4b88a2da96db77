"""Loading the tokenizer (and its chat template) that goes with a model."""

from __future__ import annotations

import json
from pathlib import Path

from albireo.config import ModelConfig


def load_tokenizer(config: ModelConfig):
    """An HF fast tokenizer from a model directory, or rebuilt from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    path = Path(config.tokenizer or config.model)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


def generation_eos_ids(config: ModelConfig) -> list[int]:
    """EOS ids from generation_config.json, which may list several (e.g. Llama 3's <|eot_id|>)."""
    path = Path(config.model) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
