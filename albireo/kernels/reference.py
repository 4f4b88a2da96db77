"""Plain torch attention over the paged KV cache: the CPU path and the oracle for GPU kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from albireo.kernels import indexable


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hk, D] at the flat cache slots [T] of caches [blocks, block_size, Hk, D],
    rounded to the caches' dtype."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        indexable(cache.view(-1, *cache.shape[2:])).index_copy_(0, slot_mapping, indexable(x.to(cache.dtype)))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's last queries over its first seq_lens[i] cached tokens.

    q [T, Hq, D] -> [T, Hq, D]; query j of a sequence with n queries sits at position
    seq_len - n + j and sees keys 0..that position. GQA: query head h reads KV head h // (Hq / Hk).
    """
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        n = end - start
        blocks = block_tables[i, : -(-seq_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out
