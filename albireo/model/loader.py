"""Building a model and filling its weights from an HF directory, a GGUF file or random values.

Every source yields (HF parameter name, tensor) pairs one at a time, so a rank copies its slice
of each tensor and drops the rest before reading the next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from albireo.config import ArchConfig, ModelConfig, read_gguf
from albireo.model.llama import LlamaForCausalLM

# GGUF tensor names (per block after "blk.N.") -> HF names (after "model.layers.N.").
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def build_model(config: ModelConfig, arch: ArchConfig, device: torch.device, max_positions: int) -> LlamaForCausalLM:
    dtype = config.torch_dtype(device)
    torch.manual_seed(config.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # rotary tables ask for float32 explicitly and keep it
    try:
        with torch.device(device):
            model = LlamaForCausalLM(arch, max_positions)
    finally:
        torch.set_default_dtype(previous)
    if config.load_format == "dummy":
        fill_dummy_weights(model)
    elif config.is_gguf:
        model.load_weights(iter_gguf(config.model, arch), source=config.model)
    else:
        model.load_weights(iter_safetensors(config.model), source=config.model)
    return model.eval()


def fill_dummy_weights(model: torch.nn.Module) -> None:
    """Small random weights (unit norms), for benchmarks that need shapes, not knowledge."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.uniform_(-0.02, 0.02)


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        path = root / file
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} listed in {index.name} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"weight file {path} is unreadable (truncated or corrupt): {e}") from e


def iter_gguf(path: str, arch: ArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize each GGUF tensor to float32 and give it its HF name."""
    from gguf import dequantize

    reader = read_gguf(path)
    # llama.cpp stores Llama/Mistral q and k rows interleaved for its rotary layout; undo that.
    permuted = arch.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        try:
            data = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"GGUF file {path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                f"which cannot be dequantized: {e}"
            ) from e
        weight = torch.from_numpy(np.array(data, dtype=np.float32))
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = arch.num_heads if "q_proj" in name else arch.num_kv_heads
            weight = unpermute_rotary_rows(weight, heads)
        yield name, weight


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match is None or match.group(2) not in _GGUF_BLOCK_NAMES:
        return None  # e.g. rope_freqs: derived from the config here
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[part]}.{kind}"


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation: per head, rows (pairs, 2) -> (2, pairs)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)
