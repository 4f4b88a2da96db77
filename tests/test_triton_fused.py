"""The fused Triton kernels against the torch layers they replace, on CPU via the Triton interpreter
(tests/interpreter.py says when it runs in this process and when in a child process).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import interpreter

_IN_PROCESS, _, test_in_interpreter_subprocess = interpreter.kernel_test_module(__file__)

from albireo.layers.norm import RMSNorm  # noqa: E402
from albireo.layers.rotary import RotaryEmbedding  # noqa: E402


@pytest.fixture(scope="module")
def tf():
    """albireo.kernels.triton_fused, its kernels in interpreter mode."""
    if not _IN_PROCESS:
        pytest.skip("run in a TRITON_INTERPRET=1 child process instead")
    from albireo.kernels import triton_fused

    return triton_fused


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _close(actual, expected, atol=1e-5, rtol=1e-5):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------- rms_norm


def _norm_layer(hidden: int, eps: float, g) -> RMSNorm:
    layer = RMSNorm(hidden, eps)
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.1 * _randn(hidden, g=g))
    return layer


@pytest.mark.parametrize("t,hidden", [(1, 64), (5, 64), (3, 576), (4, 100), (2, 4096)])
def test_rms_norm(tf, t, hidden):
    g = _gen(hidden * 31 + t)
    layer = _norm_layer(hidden, 1e-5, g)
    x = _randn(t, hidden, g=g) * 3
    _close(tf.rms_norm(x, layer.weight, layer.eps), layer(x))


@pytest.mark.parametrize("t,hidden", [(1, 64), (7, 576), (3, 100), (2, 4096)])
def test_rms_norm_residual(tf, t, hidden):
    g = _gen(hidden * 17 + t)
    layer = _norm_layer(hidden, 1e-6, g)
    x, residual = _randn(t, hidden, g=g), _randn(t, hidden, g=g) * 4
    want_out, want_res = layer(x, residual.clone())
    x_before = x.clone()
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    _close(out, want_out)
    _close(new_res, want_res, atol=0, rtol=0)
    assert new_res.data_ptr() == residual.data_ptr(), "the new residual is written in place"
    assert torch.equal(x, x_before), "x is not modified"


def test_rms_norm_with_an_addend_normalizes_the_sum_of_both_parts(tf):
    """The copy-engine all-reduce leaves the peer's partial sum beside this rank's; the norm adds it."""
    g = _gen(9)
    layer = _norm_layer(576, 1e-6, g)
    mine, theirs, residual = _randn(5, 576, g=g), _randn(5, 576, g=g), _randn(5, 576, g=g) * 4
    want_out, want_res = layer(mine + theirs, residual.clone())
    out, new_res = tf.rms_norm(mine, layer.weight, layer.eps, residual, addend=theirs)
    _close(new_res, want_res, atol=0, rtol=0)
    _close(out, want_out)


def test_rms_norm_with_a_stack_of_addends_adds_them_in_turn(tf):
    """Past two ranks the copy-engine all-reduce leaves each peer's partial sum of this rank's rows
    one after another; the norm adds them to this rank's part in turn. (In float32: the interpreter
    rounds float32 to bfloat16 otherwise than GPUs do, so the single rounding of the total is
    checked on GPUs, tests/device/test_symm_all_reduce.py.)"""
    g = _gen(10)
    layer = _norm_layer(576, 1e-6, g)
    mine, theirs, residual = _randn(5, 576, g=g), _randn(3, 5, 576, g=g), _randn(5, 576, g=g) * 4
    total = mine.clone()
    for part in theirs:
        total += part
    want_out, want_res = layer(total, residual.clone())
    out, new_res = tf.rms_norm(mine, layer.weight, layer.eps, residual, addend=theirs)
    _close(new_res, want_res, atol=0, rtol=0)
    _close(out, want_out)


def test_rms_norm_strided_rows(tf):
    """A row-strided 2D view (slice of a wider buffer) in and out, with residual."""
    g = _gen(5)
    layer = _norm_layer(64, 1e-6, g)
    x = _randn(6, 160, g=g)[:, 32:96]
    res_buf = _randn(6, 96, g=g)
    residual = res_buf[:, 16:80]
    want_out, want_res = layer(x, residual.clone())
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    _close(out, want_out)
    _close(new_res, want_res, atol=0, rtol=0)
    assert torch.equal(res_buf[:, 16:80], want_res), "written through the view"
    assert out.is_contiguous()


def test_rms_norm_head_view(tf):
    """qk-norm style: x is q [T, H, D] viewed out of a split qkv tensor (not flattenable to 2D)."""
    t, hq, hk, d = 5, 4, 2, 64
    g = _gen(6)
    layer = _norm_layer(d, 1e-6, g)
    qkv = _randn(t, (hq + 2 * hk) * d, g=g)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    _close(tf.rms_norm(q, layer.weight, layer.eps), layer(q))
    _close(tf.rms_norm(k, layer.weight, layer.eps), layer(k))


def test_rms_norm_bf16(tf):
    """bf16 through the kernel. The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to
    nearest even), so here each rounding point may be off by one bf16 ulp; exactness is checked on GPU."""
    g = _gen(7)
    hidden = 576
    layer = _norm_layer(hidden, 1e-5, g).to(torch.bfloat16)
    x = _randn(4, hidden, g=g, dtype=torch.bfloat16)
    residual = _randn(4, hidden, g=g, dtype=torch.bfloat16)
    want_out, want_res = layer(x, residual.clone())
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    _close(new_res, want_res, atol=1e-2, rtol=2**-7)
    _close(out, want_out, atol=2e-2, rtol=2**-6)


def test_rms_norm_mixed_dtypes_not_in_place(tf):
    """fp32 weight * bf16 activations promotes to fp32, as in torch; an fp32 residual with bf16 x
    gives an fp32 sum, which is written in place since the dtypes agree."""
    g = _gen(8)
    layer = _norm_layer(64, 1e-6, g)  # fp32 weight
    x = _randn(3, 64, g=g, dtype=torch.bfloat16)
    _close(tf.rms_norm(x, layer.weight, layer.eps), layer(x), atol=1e-2, rtol=1e-2)
    residual = _randn(3, 64, g=g)
    want_out, want_res = layer(x, residual.clone())
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    _close(new_res, want_res, atol=0, rtol=0)
    _close(out, want_out, atol=1e-5, rtol=1e-5)
    # bf16 residual with fp32 x: the sum is fp32, so a fresh tensor is returned.
    x32, res16 = _randn(3, 64, g=g), _randn(3, 64, g=g, dtype=torch.bfloat16)
    want_out, want_res = layer(x32, res16.clone())
    out, new_res = tf.rms_norm(x32, layer.weight, layer.eps, res16)
    assert new_res.dtype == torch.float32 and new_res.data_ptr() != res16.data_ptr()
    _close(new_res, want_res, atol=0, rtol=0)
    _close(out, want_out)


# ---------------------------------------------------------------------------- rotary


LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "t,hq,hk,d,scaling",
    [
        (1, 4, 4, 64, None),  # MHA, decode
        (6, 8, 2, 64, None),  # GQA
        (5, 6, 2, 128, LLAMA3_SCALING),  # non-power-of-2 head counts, Llama-3 scaling
        (3, 4, 1, 96, None),  # D/2 = 48, not a power of 2
    ],
)
def test_rotary_split_qkv_views(tf, t, hq, hk, d, scaling):
    g = _gen(t * 1000 + hq * 10 + d)
    rope = RotaryEmbedding(d, 512, 500000.0, scaling)
    qkv = _randn(t, (hq + 2 * hk) * d, g=g)
    positions = torch.randint(0, 512, (t,), generator=g)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    assert t == 1 or not q.is_contiguous()
    want_q, want_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()

    out_q, out_k = tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
    assert out_q is q and out_k is k
    _close(q, want_q)
    _close(k, want_k)
    assert torch.equal(v, v_before), "v (between/after q and k in qkv) is untouched"


def test_rotary_contiguous_int32_positions(tf):
    g = _gen(11)
    t, hq, hk, d = 4, 2, 2, 64
    rope = RotaryEmbedding(d, 128, 10000.0, None)
    q, k = _randn(t, hq, d, g=g), _randn(t, hk, d, g=g)
    positions = torch.tensor([0, 127, 5, 5], dtype=torch.int32)
    want_q, want_k = rope(positions.long(), q.clone(), k.clone())
    tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
    _close(q, want_q)
    _close(k, want_k)


def test_rotary_bf16(tf):
    g = _gen(12)
    t, hq, hk, d = 3, 4, 2, 64
    rope = RotaryEmbedding(d, 256, 500000.0, None)
    qkv = _randn(t, (hq + 2 * hk) * d, g=g, dtype=torch.bfloat16)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    positions = torch.randint(0, 256, (t,), generator=g)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
    _close(q, want_q, atol=2e-2, rtol=1e-2)
    _close(k, want_k, atol=2e-2, rtol=1e-2)


def test_rotary_with_store_kv_fills_the_cache_as_write_kv_does(tf):
    from albireo.kernels import reference

    g = _gen(13)
    t, hq, hk, d, page = 5, 4, 2, 64, 4
    rope = RotaryEmbedding(d, 256, 500000.0, None)
    qkv = _randn(t, (hq + 2 * hk) * d, g=g)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    positions = torch.randint(0, 256, (t,), generator=g)
    slots = torch.tensor([9, 2, -1, 15, 4])  # -1: a padding row that must store nothing
    want_q, want_k = rope(positions, q.clone(), k.clone())
    want_k_cache, want_v_cache = torch.zeros(4, page, hk, d), torch.zeros(4, page, hk, d)
    keep = slots >= 0
    reference.write_kv(want_k[keep], v[keep], want_k_cache, want_v_cache, slots[keep])

    k_cache, v_cache = torch.zeros(4, page, hk, d), torch.zeros(4, page, hk, d)
    tf.apply_rotary(positions, q, k, rope.cos, rope.sin, store_kv=(v, k_cache, v_cache, slots))
    _close(q, want_q)
    _close(k, want_k)
    _close(k_cache, want_k_cache)
    assert torch.equal(v_cache, want_v_cache)


# ---------------------------------------------------------------------------- silu_and_mul


def _torch_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # exactly as LlamaMLP.forward
    return F.silu(gate) * up


@pytest.mark.parametrize("t,inter", [(1, 128), (5, 1536), (3, 100), (2, 4096)])
def test_silu_and_mul(tf, t, inter):
    g = _gen(t * 7 + inter)
    x = _randn(t, 2 * inter, g=g) * 4
    _close(tf.silu_and_mul(x), _torch_silu_and_mul(x))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_silu_and_mul_strided_rows_and_extremes(tf):
    g = _gen(13)
    buf = _randn(4, 2 * 256 + 32, g=g) * 4
    x = buf[:, 16 : 16 + 2 * 256]
    x[0, :8] = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, -0.0])
    _close(tf.silu_and_mul(x), _torch_silu_and_mul(x))


def test_silu_and_mul_bf16(tf):
    """bf16 through the kernel; off by up to 2 bf16 ulps here (interpreter truncation, see above)."""
    g = _gen(14)
    x = _randn(3, 2 * 512, g=g, dtype=torch.bfloat16) * 3
    _close(tf.silu_and_mul(x), _torch_silu_and_mul(x), atol=2e-2, rtol=2**-6)
