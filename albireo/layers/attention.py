"""Attention over the paged KV cache, behind one interface for every backend.

A step's tokens come flattened: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1],
which are its last tokens, and it attends to its first seq_lens[i] tokens through block_tables[i].
Prefill, chunked prefill over a cached prefix and decode are the same computation with different
lengths, so one call per layer serves a mixed batch. On CUDA the Triton kernels run it; elsewhere
the torch reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from albireo import kernels
from albireo.kernels import reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset); -1 skips the row
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: tokens each sequence attends to, new ones included
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    # Host copies, for the reference backend, which loops over sequences.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Called with the layer's index before it reads the cache: waits for KV blocks being loaded.
    before_attention: Callable[[int], None] | None = None


class Attention(nn.Module):
    """Writes this step's K/V into the layer's pages, then attends causally over the pages."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = 0  # set by the model runner when it binds the cache
        # [num_blocks, block_size, num_kv_heads, head_dim] each; bound by the model runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: Callable | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hk, D] -> [T, Hq * D].

        With rotary (a RotaryEmbedding), q and k are first rotated by their positions [T]; on CUDA
        with fused kernels one launch rotates them and stores k and v in the cache.
        """
        if meta.before_attention is not None:
            meta.before_attention(self.layer_idx)
        rotate_and_store = rotary is not None and kernels.fused_on(q)
        if rotary is not None and not rotate_and_store:
            q, k = rotary(positions, q, k)
        if q.is_cuda:
            from albireo.kernels import triton_attention

            if rotate_and_store:
                from albireo.kernels.triton_fused import apply_rotary

                apply_rotary(positions, q, k, rotary.cos, rotary.sin,
                             store_kv=(v, self.k_cache, self.v_cache, meta.slot_mapping))
            else:
                triton_attention.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            out = triton_attention.paged_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                self.scale, meta.max_query_len,
            )
        else:
            reference.write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            out = reference.paged_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.query_start_loc_cpu, meta.seq_lens_cpu,
                self.scale,
            )
        return out.reshape(q.shape[0], -1)
