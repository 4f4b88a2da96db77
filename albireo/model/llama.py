"""The Llama family in one file: Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

The four differ only in switches read from ArchConfig, so one implementation serves them all.
Input is a flat batch of tokens from many sequences; attention metadata says which is which.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from albireo.config import ArchConfig
from albireo.distributed.parallel_state import tp_size
from albireo.layers.attention import Attention, AttentionMetadata
from albireo.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from albireo.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, SplitRows, whole
from albireo.layers.norm import RMSNorm
from albireo.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        tp = tp_size()
        self.num_heads = arch.num_heads // tp
        self.num_kv_heads = max(1, arch.num_kv_heads // tp)
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, bias=arch.qkv_bias
        )
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, arch.head_dim, arch.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor | SplitRows, meta: AttentionMetadata, residual: torch.Tensor,
        norm: RMSNorm,
    ) -> tuple[torch.Tensor | SplitRows, torch.Tensor]:
        """Attention of the normalized x, added to the residual stream and normalized by `norm`."""
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.local_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, meta, self.rotary, positions), residual=residual, norm=norm)


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [arch.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size)

    def forward(
        self, x: torch.Tensor | SplitRows, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor | SplitRows, torch.Tensor]:
        """The MLP of the normalized x, added to the residual stream and normalized by `norm`."""
        return self.down_proj(self.gate_up_proj(x), silu_mul=True, residual=residual, norm=norm)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, max_positions)
        self.mlp = LlamaMLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor | SplitRows, residual: torch.Tensor, meta: AttentionMetadata,
        next_norm: RMSNorm,
    ) -> tuple[torch.Tensor | SplitRows, torch.Tensor]:
        """x is this layer's input, already normalized by its input_layernorm; returns the next
        layer's, normalized by `next_norm` (the next layer's input_layernorm, or the final norm), and
        the residual stream. Each row-parallel projection thus ends in the norm after it, so that the
        projection's all-reduce, the residual add and the norm can run as one kernel. At a large
        prefill step under TP x is split by rows between the ranks (`SplitRows`), and the
        column-parallel projection multiplies this rank's while the peers' come over NVLink."""
        x, residual = self.self_attn(positions, x, meta, residual, self.post_attention_layernorm)
        return self.mlp(x, residual, next_norm)


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, max_positions) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        residual = self.embed_tokens(input_ids)
        x = self.layers[0].input_layernorm(residual)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, next_norms):
            x, residual = layer(positions, x, residual, meta, next_norm)
        return whole(x)


class LlamaForCausalLM(nn.Module):
    # Checkpoint projections that live fused in one parameter here: name -> (fused name, shard).
    fused_weights: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, max_positions)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of T tokens."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits for all of the vocabulary, or with gather=False only this rank's shard of it, in the
        model's dtype: the sampler widens them to float32 as it reads them (exact), so no pass
        writes a float32 copy and a TP exchange moves half the bytes at bf16."""
        if not gather:
            return self.lm_head.local_logits(hidden)
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy checkpoint tensors (HF names) into this rank's parameters; fail on any gap."""
        params = dict(self.named_parameters())
        expected = set(params)
        for ckpt_part, (fused, _) in self.fused_weights.items():
            expected |= {name.replace(fused, ckpt_part) for name in params if fused in name}
        expected -= {name for name in params if any(fused in name for fused, _ in self.fused_weights.values())}
        for ckpt_name, tensor in weights:
            if "rotary_emb" in ckpt_name or (ckpt_name == "lm_head.weight" and self.arch.tie_word_embeddings):
                continue
            name, shard = ckpt_name, None
            for ckpt_part, (fused, shard_id) in self.fused_weights.items():
                if f".{ckpt_part}." in name:
                    name, shard = name.replace(ckpt_part, fused), shard_id
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"{source}: unexpected weight {ckpt_name!r} for {self.arch.architecture}")
            loader = getattr(param, "weight_loader", _copy_whole)
            try:
                with torch.no_grad():
                    tensor = tensor.to(param.dtype)
                    loader(param, tensor, shard) if shard is not None else loader(param, tensor)
            except RuntimeError as e:
                raise ValueError(
                    f"{source}: weight {ckpt_name!r} of shape {tuple(tensor.shape)} does not fit the model config: {e}"
                ) from e
            expected.discard(ckpt_name)
        if expected:
            raise ValueError(f"{source} is missing weights: {', '.join(sorted(expected)[:5])}")


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise RuntimeError(f"expected shape {tuple(param.shape)}")
    param.data.copy_(loaded)
