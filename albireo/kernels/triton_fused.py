"""Fused Triton kernels for the elementwise/row-wise parts of a decoder layer.

Each wrapper reproduces the torch layer it replaces, including its intermediate casts:

* ``rms_norm``      -- ``albireo.layers.norm.RMSNorm.forward`` (optionally with the residual add).
* ``apply_rotary``  -- ``albireo.layers.rotary.RotaryEmbedding.forward``, but in place.
* ``silu_and_mul``  -- ``F.silu(gate) * up`` of ``LlamaMLP`` on the fused gate_up output.

All math is done in float32. Where the torch code rounds an intermediate to the activation
dtype (bf16/fp16), the kernel rounds at the same point, so with bf16 inputs the results agree
with torch up to fp32 reduction order / transcendental accuracy, usually bit for bit.

The kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1``) on CPU tensors,
which is how they are tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from albireo.kernels import pdl

__all__ = ["apply_rotary", "rms_norm", "silu_and_mul"]

# One program handles a whole row of rms_norm; rows longer than this would not fit in registers.
MAX_NORM_BLOCK = 65536


def norm_num_warps(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


# --------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    add_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    B,  # rows are indexed as (a, b) with b < B: supports [A, B, N] views such as q [T, H, D]
    x_sa,
    x_sb,
    res_sa,
    res_sb,
    res_out_sa,
    res_out_sb,
    N,
    eps,
    ADDENDS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # no kernel writes a weight: read before the wait
    pdl.launch_next_now(PDL)  # a projection follows
    pdl.wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    a = row // B
    b = row % B

    x = tl.load(x_ptr + a * x_sa + b * x_sb + cols, mask=mask, other=0.0)
    if ADDENDS > 0:
        # The other ranks' parts of an all-reduce: x + each addend in turn, rounded once (at two
        # ranks, as the all-reduce rounds a + b).
        total = x.to(tl.float32)
        for k in tl.static_range(ADDENDS):
            total += tl.load(add_ptr + (k * tl.num_programs(0) + row) * N + cols, mask=mask, other=0.0).to(tl.float32)
        x = total.to(x.dtype)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + a * res_sa + b * res_sb + cols, mask=mask, other=0.0)
        # torch: s = x + residual, computed in fp32 and rounded to the promoted dtype.
        s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + a * res_out_sa + b * res_out_sb + cols, s, mask=mask)
    else:
        s = x

    tl.store(out_ptr + row * N + cols, rms_normalize(s, w, N, eps).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_normalize(s, w, N, eps):
    """w * norm(s) of one row (w: the norm weight's values), in float32 for the caller to round
    to its output dtype."""
    h = s.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    rstd = tl.rsqrt(var + eps)
    # torch: h.to(x.dtype), then weight * that (in the promoted dtype of weight and x).
    normed = (h * rstd).to(s.dtype).to(tl.float32)
    return normed * w.to(tl.float32)


def _as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """View t [..., N] as [A, B, N] with unit stride in N: (t3, A, B, stride_a, stride_b)."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() == 2:
        t = t.unsqueeze(1)
    elif t.dim() > 3:
        t = t.reshape(-1, *t.shape[-2:])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.shape[0], t.shape[1], t.stride(0), t.stride(1)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x; same results as ``RMSNorm.forward(x, residual)``, or with
    ``addend`` (contiguous, x's shape and dtype) as ``RMSNorm.forward(x + addend, residual)``; a
    stack of k such addends ([k, *x.shape]) is added in turn in float32 and rounded once.

    Without residual: returns ``weight * norm(x.float()).to(x.dtype)``.
    With residual: s = x + residual; returns ``(weight * norm(s.float()).to(s.dtype), s)``.

    IN PLACE: when ``residual`` has the dtype of ``x + residual`` (the usual case, both bf16),
    s is written into ``residual`` itself and ``residual`` is returned as the new residual;
    its old contents are destroyed. ``x`` is never modified. The output is a new contiguous
    tensor with x's shape. x may be a strided view (e.g. q [T, H, D] from a split qkv).
    """
    n = x.shape[-1]
    assert weight.dim() == 1 and weight.shape[0] == n, "weight must be [hidden]"
    block = triton.next_power_of_2(n)
    assert block <= MAX_NORM_BLOCK, f"rms_norm: hidden size {n} is too large for one program per row"
    weight = weight.contiguous()

    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, s_dtype), device=x.device)
    x3, a, b, x_sa, x_sb = _as_rows(x)
    if residual is None:
        res3, res_sa, res_sb = x3, 0, 0
        res_out3, res_out_sa, res_out_sb = x3, 0, 0
        new_residual = None
    else:
        assert residual.shape == x.shape, "residual must have x's shape"
        res3, _, _, res_sa, res_sb = _as_rows(residual)
        # Write in place only if res3 aliases `residual` itself (_as_rows made no copy).
        in_place = residual.dtype == s_dtype and res3.data_ptr() == residual.data_ptr()
        if in_place:
            new_residual = residual
            res_out3, res_out_sa, res_out_sb = res3, res_sa, res_sb
        else:
            new_residual = torch.empty(x.shape, dtype=s_dtype, device=x.device)
            res_out3, _, _, res_out_sa, res_out_sb = _as_rows(new_residual)

    addends = 0
    if addend is not None:
        stacked = addend.dim() == x.dim() + 1
        assert addend.shape[int(stacked):] == x.shape and addend.dtype == x.dtype and addend.is_contiguous(), \
            "addend must be contiguous, with x's shape and dtype or a stack of such"
        addends = addend.shape[0] if stacked else 1
    rows = a * b
    if rows > 0:
        on = pdl.enabled(x)
        _rms_norm_kernel[(rows,)](
            x3,
            addend if addend is not None else x3,
            res3,
            weight,
            out,
            res_out3,
            b,
            x_sa,
            x_sb,
            res_sa,
            res_sb,
            res_out_sa,
            res_out_sb,
            n,
            eps,
            ADDENDS=addends,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            PDL=on,
            num_warps=norm_num_warps(block),
            launch_pdl=on,
        )
    return out if residual is None else (out, new_residual)


# --------------------------------------------------------------------------------------------
# Rotary embedding (rotate-half), in place on q and k
# --------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(base_ptr, stride_h, H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, d, cos, sin):
    """Rotates a token's H heads in place; returns the rotated halves in the storage dtype."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < H) & (d[None, :] < HALF)
    p1 = base_ptr + h[:, None] * stride_h + d[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(base_ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(base_ptr.dtype.element_ty)
    tl.store(p1, o1, mask=mask)
    tl.store(p2, o2, mask=mask)
    return o1, o2


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_st,
    q_sh,
    k_st,
    k_sh,
    cos_st,
    sin_st,
    v_ptr,
    v_st,
    v_sh,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    cache_sb,
    cache_ss,
    cache_sh,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_KV: tl.constexpr,
    PAGE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cos = tl.load(cos_ptr + pos * cos_st + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * sin_st + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * q_st, q_sh, HQ, HALF, BLOCK_HQ, d, cos, sin)
    k1, k2 = _rotate_heads(k_ptr + t * k_st, k_sh, HK, HALF, BLOCK_HK, d, cos, sin)
    if STORE_KV:
        # The rotated k and the untouched v go to the token's cache slot; a negative slot is a
        # padding row and stores nothing.
        slot = tl.load(slot_ptr + t)
        h = tl.arange(0, BLOCK_HK)[:, None]
        mask = (h < HK) & (d[None, :] < HALF) & (slot >= 0)
        dst = (slot // PAGE) * cache_sb + (slot % PAGE) * cache_ss + h * cache_sh + d[None, :]
        tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + t * v_st + h * v_sh + d[None, :]
        tl.store(v_cache_ptr + dst, tl.load(v_src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    store_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] IN PLACE by the cos/sin rows [max_pos, D/2] of positions [T].

    Same math as ``RotaryEmbedding.forward`` (rotate-half layout, fp32, cast back), one launch
    for q and k. q and k may be strided views (e.g. split from a [T, (Hq+2Hk)*D] qkv tensor and
    viewed as [T, H, D]); only the last dim must be contiguous. Returns (q, k), the same tensors.
    positions are not bounds-checked: each must be < max_pos.

    store_kv = (v, k_cache, v_cache, slot_mapping) also stores the rotated k and v [T, Hk, D] at
    the flat slots [T] of the caches [blocks, block_size, Hk, D] in the same launch, as
    ``write_kv`` would (negative slots are skipped).
    """
    assert q.dim() == 3 and k.dim() == 3, "q and k must be [T, H, D]"
    t, hq, d = q.shape
    assert k.shape[0] == t and k.shape[2] == d, "q and k must agree on T and D"
    assert d % 2 == 0, "head_dim must be even"
    half = d // 2
    assert cos.dim() == 2 and cos.shape[1] == half and sin.shape == cos.shape, "cos/sin must be [max_pos, D/2]"
    assert positions.shape == (t,), "positions must be [T]"
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last dim"
    assert cos.stride(1) == 1 and sin.stride(1) == 1, "cos/sin need a contiguous last dim"
    hk = k.shape[1]
    positions = positions.contiguous()
    if t == 0:
        return q, k
    if store_kv is None:
        v, k_cache, v_cache, slots, page = k, k, k, positions, 1  # unused: STORE_KV is off
        v_strides, cache_strides = (0, 0), (0, 0, 0)
    else:
        v, k_cache, v_cache, slots = store_kv
        assert v.shape == k.shape and v.stride(2) == 1 and slots.shape == (t,)
        assert k_cache.shape[2:] == (hk, d) and v_cache.stride() == k_cache.stride() and k_cache.stride(3) == 1
        page = k_cache.shape[1]
        v_strides, cache_strides = (v.stride(0), v.stride(1)), k_cache.stride()[:3]
    on = pdl.enabled(q)
    _rotary_kernel[(t,)](
        positions,
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        v,
        *v_strides,
        k_cache,
        v_cache,
        slots,
        *cache_strides,
        HQ=hq,
        HK=hk,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_D=triton.next_power_of_2(half),
        STORE_KV=store_kv is not None,
        PAGE=page,
        PDL=on,
        num_warps=4,
        launch_pdl=on,
    )
    return q, k


# --------------------------------------------------------------------------------------------
# SiLU(gate) * up
# --------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_st, out_st, I, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    row = x_ptr + t * x_st
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + I + cols, mask=mask, other=0.0).to(tl.float32)
    # torch: F.silu(gate) is rounded to the activation dtype before the multiply by up.
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * out_st + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:] as a new [T, I] tensor of x's dtype (fp32 math).

    Rounds silu(gate) to x's dtype before multiplying, as ``F.silu(gate) * up`` does.
    x may have any row stride; its last dim must be contiguous.
    """
    assert x.dim() == 2 and x.shape[1] % 2 == 0, "x must be [T, 2I]"
    if x.stride(1) != 1:
        x = x.contiguous()
    t, i = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t == 0 or i == 0:
        return out
    block = min(1024, triton.next_power_of_2(i))
    _silu_and_mul_kernel[(t, triton.cdiv(i, block))](x, out, x.stride(0), out.stride(0), i, BLOCK=block, num_warps=4)
    return out
