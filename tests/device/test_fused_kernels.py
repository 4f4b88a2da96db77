"""The fused Triton kernels on the GPU against the torch layers they replace, bf16 at Llama shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from albireo.layers.norm import RMSNorm  # noqa: E402
from albireo.layers.rotary import RotaryEmbedding  # noqa: E402

# name -> (hidden, intermediate, Hq, Hk, D, rope_theta, rope_scaling)
SHAPES = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 500000.0, {
        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128, 500000.0, {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }),
}
TOKENS = [1, 7, 256, 2048]
MAX_POS = 16384
BF16 = torch.bfloat16

# bf16 has 8 significant bits: one ulp is at most 2^-7 of the value. The kernels round at the same
# points as torch, so they may differ from it by one ulp where fp32 sum order / exp accuracy tips a
# rounding, and such elements must be rare.
ULP_RTOL, ULP_ATOL = 2**-7, 1e-3
MAX_MISMATCH_FRACTION = 0.02


@pytest.fixture(scope="module")
def tf():
    from albireo.kernels import triton_fused

    return triton_fused


def _check_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=ULP_RTOL, atol=ULP_ATOL)
    mismatch = (actual != expected).float().mean().item()
    assert mismatch <= MAX_MISMATCH_FRACTION, f"{mismatch:.2%} of elements differ from torch"


def _norm(hidden: int, dtype=BF16) -> RMSNorm:
    layer = RMSNorm(hidden, 1e-5).cuda()
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.2 * torch.randn(hidden, device="cuda"))
    return layer.to(dtype)


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("t", TOKENS)
def test_rms_norm_bf16(tf, model, t):
    torch.manual_seed(t)
    hidden = SHAPES[model][0]
    layer = _norm(hidden)
    x = torch.randn(t, hidden, device="cuda", dtype=BF16) * 2
    _check_bf16(tf.rms_norm(x, layer.weight, layer.eps), layer(x))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("t", TOKENS)
def test_rms_norm_residual_bf16(tf, model, t):
    torch.manual_seed(100 + t)
    hidden = SHAPES[model][0]
    layer = _norm(hidden)
    x = torch.randn(t, hidden, device="cuda", dtype=BF16)
    residual = torch.randn(t, hidden, device="cuda", dtype=BF16) * 8
    want_out, want_res = layer(x, residual.clone())
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    assert torch.equal(new_res, want_res), "x + residual is one bf16 rounding in both"
    assert new_res.data_ptr() == residual.data_ptr()
    _check_bf16(out, want_out)


def test_rms_norm_float32_tight(tf):
    torch.manual_seed(3)
    layer = _norm(4096, torch.float32)
    x, residual = torch.randn(64, 4096, device="cuda"), torch.randn(64, 4096, device="cuda")
    want_out, want_res = layer(x, residual.clone())
    out, new_res = tf.rms_norm(x, layer.weight, layer.eps, residual)
    torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


def test_rms_norm_qk_norm_head_views(tf):
    """Qwen3-style q/k norm on [T, H, D] views of a split qkv."""
    torch.manual_seed(4)
    t, hq, hk, d = 33, 32, 8, 128
    layer = _norm(d)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=BF16)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    _check_bf16(tf.rms_norm(q, layer.weight, layer.eps), layer(q))
    _check_bf16(tf.rms_norm(k, layer.weight, layer.eps), layer(k))


def _split_qkv(t, hq, hk, d, dtype=BF16):
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype) * 2
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("t", TOKENS)
def test_rotary_bf16_split_views(tf, model, t):
    torch.manual_seed(200 + t)
    _, _, hq, hk, d, theta, scaling = SHAPES[model]
    rope = RotaryEmbedding(d, MAX_POS, theta, scaling).cuda()
    q, k, v = _split_qkv(t, hq, hk, d)
    positions = torch.randint(0, MAX_POS, (t,), device="cuda")
    want_q, want_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()
    out_q, out_k = tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
    assert out_q is q and out_k is k
    _check_bf16(q, want_q)
    _check_bf16(k, want_k)
    assert torch.equal(v, v_before)


def test_rotary_float32_tight(tf):
    torch.manual_seed(5)
    _, _, hq, hk, d, theta, scaling = SHAPES["llama-3.1-8b"]
    rope = RotaryEmbedding(d, MAX_POS, theta, scaling).cuda()
    q, k, _ = _split_qkv(100, hq, hk, d, torch.float32)
    positions = torch.randint(0, MAX_POS, (100,), device="cuda", dtype=torch.int32)
    want_q, want_k = rope(positions.long(), q.clone(), k.clone())
    tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [BF16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_rotary_stores_the_rotated_keys_and_the_values_as_write_kv_does(tf, cache_dtype):
    """kv_cache_dtype fp8 included: each stored value is the rotated bf16 key (or the value)
    rounded to the cache's dtype, as the unfused rotary and write_kv store it."""
    from albireo.kernels import reference

    torch.manual_seed(8)
    _, _, hq, hk, d, theta, scaling = SHAPES["llama-3.1-8b"]
    rope = RotaryEmbedding(d, MAX_POS, theta, scaling).cuda()
    t, page, blocks = 300, 16, 32
    q, k, v = _split_qkv(t, hq, hk, d)
    positions = torch.randint(0, MAX_POS, (t,), device="cuda")
    slots = torch.randperm(blocks * page, device="cuda")[:t]
    k_cache, v_cache, want_k, want_v = (torch.zeros(blocks, page, hk, d, device="cuda", dtype=cache_dtype)
                                        for _ in range(4))
    tf.apply_rotary(positions, q, k, rope.cos, rope.sin, store_kv=(v, k_cache, v_cache, slots))
    reference.write_kv(k, v, want_k, want_v, slots)  # k: rotated in place by the kernel
    assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))


def _torch_silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("t", TOKENS)
def test_silu_and_mul_bf16(tf, model, t):
    torch.manual_seed(300 + t)
    inter = SHAPES[model][1]
    x = torch.randn(t, 2 * inter, device="cuda", dtype=BF16) * 3
    _check_bf16(tf.silu_and_mul(x), _torch_silu_and_mul(x))


def test_silu_and_mul_float32_tight(tf):
    torch.manual_seed(6)
    x = torch.randn(64, 2 * 8192, device="cuda") * 5
    torch.testing.assert_close(tf.silu_and_mul(x), _torch_silu_and_mul(x), rtol=1e-5, atol=1e-6)


def test_kernels_replay_in_a_cuda_graph(tf):
    """The engine captures decode steps in CUDA graphs: the kernels must capture and replay."""
    torch.manual_seed(7)
    hidden, inter, hq, hk, d, theta, scaling = SHAPES["llama-3.2-1b"]
    t = 16
    layer = _norm(hidden)
    rope = RotaryEmbedding(d, MAX_POS, theta, scaling).cuda()
    x = torch.randn(t, hidden, device="cuda", dtype=BF16)
    residual = torch.zeros(t, hidden, device="cuda", dtype=BF16)
    q, k, _ = _split_qkv(t, hq, hk, d)
    positions = torch.zeros(t, dtype=torch.long, device="cuda")
    gate_up = torch.randn(t, 2 * inter, device="cuda", dtype=BF16)

    def step():
        out, _ = tf.rms_norm(x, layer.weight, layer.eps, residual)
        tf.apply_rotary(positions, q, k, rope.cos, rope.sin)
        return out, tf.silu_and_mul(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_act = step()

    # New inputs in the captured buffers.
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    res_before = residual.clone()
    q_before, k_before = q.clone(), k.clone()
    positions.copy_(torch.randint(0, MAX_POS, (t,), device="cuda"))
    gate_up.copy_(torch.randn_like(gate_up))
    graph.replay()
    torch.cuda.synchronize()

    want_out, want_res = layer(x, res_before)
    assert torch.equal(residual, want_res)
    _check_bf16(g_out, want_out)
    want_q, want_k = rope(positions, q_before, k_before)
    _check_bf16(q, want_q)
    _check_bf16(k, want_k)
    _check_bf16(g_act, _torch_silu_and_mul(gate_up))


def test_empty_batch(tf):
    x = torch.empty(0, 2048, device="cuda", dtype=BF16)
    w = torch.ones(2048, device="cuda", dtype=BF16)
    assert tf.rms_norm(x, w, 1e-5).shape == (0, 2048)
    assert tf.silu_and_mul(torch.empty(0, 512, device="cuda", dtype=BF16)).shape == (0, 256)


def test_gumbel_sampling_matches_softmax_frequencies_on_gpu():
    from albireo.kernels.triton_sampling import gumbel_sample

    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")], device="cuda")
    rows = 200_000
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda") * 7919 + 1
    out = gumbel_sample(base.expand(rows, -1).contiguous(), torch.full((rows,), 0.7, device="cuda"), seeds)
    freq = torch.bincount(out, minlength=6).float() / rows
    torch.testing.assert_close(freq, torch.softmax(base / 0.7, dim=0), atol=0.005, rtol=0)


def test_gumbel_sampling_greedy_rows_equal_argmax_at_vocab_128k():
    from albireo.kernels.triton_sampling import gumbel_sample

    logits = torch.randn(64, 128256, device="cuda")
    out = gumbel_sample(logits, torch.zeros(64, device="cuda"), torch.zeros(64, dtype=torch.int64, device="cuda"))
    assert torch.equal(out, logits.argmax(dim=1))


# The decode projections of the two models (N, K) at TP=1 and 2, and a 128k-vocabulary LM head.
GEMV_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 2048), (2048, 4096), (128256, 4096)]


@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("rows", [1, 4])
def test_gemv_bf16_equals_fp32_product_within_rounding(n, k, rows):
    from albireo.kernels.triton_gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(n + k + rows)
    x = torch.randn(rows, k, device="cuda", generator=g).to(BF16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(BF16)
    torch.full((rows, n), float("nan"), device="cuda", dtype=BF16)  # poison what the allocator hands out next
    got = gemv(x, w)
    exact = F.linear(x.float(), w.float())
    assert torch.isfinite(got).all()
    # One bf16 rounding of the output plus fp32 sum-order differences.
    torch.testing.assert_close(got.float(), exact, rtol=ULP_RTOL, atol=1e-2)


def test_gemv_silu_mul_bf16_equals_torch_mlp_tail():
    from albireo.kernels.triton_gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(3)
    gate_up = torch.randn(1, 2 * 14336, device="cuda", generator=g).to(BF16)
    w = (torch.randn(4096, 14336, device="cuda", generator=g) * 14336**-0.5).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.linear((F.silu(gate) * up).float(), w.float())
    torch.testing.assert_close(gemv(gate_up, w, silu_mul=True).float(), expected, rtol=ULP_RTOL, atol=1e-2)


def test_one_row_linear_agrees_with_cublas():
    from albireo.layers.linear import linear

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(1, 4096, device="cuda", generator=g).to(BF16)
    w = (torch.randn(6144, 4096, device="cuda", generator=g) / 64).to(BF16)
    torch.testing.assert_close(linear(x, w).float(), F.linear(x, w).float(), rtol=2 * ULP_RTOL, atol=1e-2)


@pytest.mark.parametrize("silu_mul", [False, True])
def test_row_parallel_layer_adding_into_the_residual_in_its_matmul_rounds_the_sum_once(silu_mul):
    """At TP=1 a many-row o_proj / down_proj adds its product into the residual stream inside the
    cuBLAS matmul (beta = 1): the new residual is the sum rounded once, on average no further from
    the float64 sum than the product rounded, then added and rounded again; the norm after it is
    the norm of that residual."""
    from albireo.layers import linear as linear_mod
    from albireo.layers.linear import RowParallelLinear

    g = torch.Generator(device="cuda").manual_seed(6)
    hidden, inner, rows = 2048, 8192, 300
    layer = RowParallelLinear(inner, hidden).cuda().to(BF16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(hidden, inner, device="cuda", generator=g) / 64)
    x = torch.randn(rows, 2 * inner if silu_mul else inner, device="cuda", generator=g).to(BF16)
    residual = torch.randn(rows, hidden, device="cuda", generator=g).to(BF16)
    norm = _norm(hidden)
    inputs = linear_mod.silu_and_mul(x) if silu_mul else x
    exact = inputs.double() @ layer.weight.double().t() + residual.double()

    assert linear_mod._gemm_adds_residual(x, layer.weight, residual)
    normed, summed = layer(x, silu_mul=silu_mul, residual=residual.clone(), norm=norm)
    twice = (F.linear(inputs, layer.weight) + residual).double()
    assert (summed.double() - exact).abs().mean() <= (twice - exact).abs().mean()
    torch.testing.assert_close(summed.double(), exact, rtol=ULP_RTOL, atol=1e-2)
    _check_bf16(normed, norm(summed.clone()))
