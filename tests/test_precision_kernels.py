"""Precision policies on the kernels MTIA runs whole (``KERNEL_FORMATS`` of
``lowering.passes.precision``): ``swiglu`` and ``moe_ffn`` get ``x_format`` /
``w_format`` when their weights are program parameters, ``flash_attention``
gets ``kv_format`` under ``PrecisionPolicy(kv_cache=...)``; numerics against
references built from ``mtia_jax.mx.fake_quantize``; packed bytes charged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from kernels import inner, kernels_with, ops_with
from lowering.ir import TensorType
from lowering.passes.precision import KERNEL_FORMATS
from mtia_jax.mx import MXType, fake_quantize
from runtime.accelerated.moe import expected_experts_hit
from runtime.accelerated.mx_matmul import packed_bytes

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32
POLICY = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8")
KV_POLICY = mtia_jax.PrecisionPolicy(kv_cache="mx8")
MX8, MX4 = "mxfp8_e4m3", "mxfp4_e2m1"


def _type(shape, dtype=BF16) -> TensorType:
    return TensorType(shape, np.dtype(dtype))


def _compiled(f, *structs, precision=None):
    return mtia_jax.jit(f, chip="mtia450", precision=precision).lower(*structs).compile()


def _the(module, kind):
    """The one op of ``kind`` in ``module``, looked for inside fused kernels too."""
    (op,) = ops_with(module.ops, kind)
    return inner(op, kind)


def test_kernel_formats_table():
    assert set(KERNEL_FORMATS) == {"swiglu", "moe_ffn", "moe_experts", "flash_attention",
                                   "paged_attention"}


# ------------------------------------------------------------ swiglu

M, D, F = 16, 64, 128
SWIGLU = (S((M, D), BF16), S((D, F), BF16), S((D, F), BF16))


def test_swiglu_gets_the_policy_formats_when_its_weights_are_parameters():
    op = _the(_compiled(mtia_jax.swiglu, *SWIGLU, precision=POLICY).module, "swiglu")
    assert op.params["x_format"] == MX8 and op.params["w_format"] == MX4
    # without a policy: no formats
    op = _the(_compiled(mtia_jax.swiglu, *SWIGLU).module, "swiglu")
    assert "x_format" not in op.params and "w_format" not in op.params
    # a policy for the weights only: only w_format
    op = _the(_compiled(mtia_jax.swiglu, *SWIGLU,
                        precision=mtia_jax.PrecisionPolicy(weights="mx6")).module, "swiglu")
    assert op.params["w_format"] == "mxfp6_e2m3" and "x_format" not in op.params
    # a kv_cache-only policy leaves swiglu alone
    op = _the(_compiled(mtia_jax.swiglu, *SWIGLU, precision=KV_POLICY).module, "swiglu")
    assert "x_format" not in op.params and "w_format" not in op.params


def test_swiglu_with_a_computed_weight_gets_no_formats():
    f = lambda x, w: mtia_jax.swiglu(x, w * 2, w)  # w_gate is not a parameter
    compiled = _compiled(f, SWIGLU[0], SWIGLU[1], precision=POLICY)
    op = _the(compiled.module, "swiglu")
    assert "x_format" not in op.params and "w_format" not in op.params


def test_swiglu_weights_through_views_and_inside_a_fused_kernel():
    # the norm is a prologue of the swiglu kernel; the weights reach it through
    # a transpose (a weight view): formats are set on the fused swiglu
    def f(x, g, wg_t, wu):
        return mtia_jax.swiglu(mtia_jax.rms_norm(x, g), wg_t.T, wu)
    structs = (SWIGLU[0], S((D,), BF16), S((F, D), BF16), SWIGLU[2])
    compiled = _compiled(f, *structs, precision=POLICY)
    (kernel,) = ops_with(compiled.module.ops, "swiglu")
    assert kernel.kind == "fused_kernel"
    assert "rms_norm" in [o.kind for o in kernel.regions["body"].ops]
    op = inner(kernel, "swiglu")
    assert op.params["x_format"] == MX8 and op.params["w_format"] == MX4


def test_swiglu_inside_a_scan_over_stacked_weights_gets_formats():
    def f(x, wg, wu):
        return lax.scan(lambda c, w: (c, mtia_jax.swiglu(c, w[0], w[1])), x, (wg, wu))[1]
    structs = (SWIGLU[0], S((3, D, F), BF16), S((3, D, F), BF16))
    compiled = _compiled(f, *structs, precision=POLICY)
    (scan,) = [op for op in compiled.module.ops if op.kind == "scan"]
    op = _the(scan.regions["body"], "swiglu")
    assert op.params["x_format"] == MX8 and op.params["w_format"] == MX4


def _swiglu_reference(x, w_gate, w_up, x_format, w_format):
    """silu(g) * u with g, u float32 products of the MX fake-quantized
    operands (x in blocks along its last axis, the weights along axis 0),
    rounded once to the promoted dtype."""
    dtype = jnp.result_type(x, w_gate, w_up)
    xq = fake_quantize(x.astype(dtype), x_format, -1).astype(F32)
    gq = fake_quantize(w_gate.astype(dtype), w_format, 0).astype(F32)
    uq = fake_quantize(w_up.astype(dtype), w_format, 0).astype(F32)
    g = jnp.matmul(xq, gq, precision=lax.Precision.HIGHEST)
    u = jnp.matmul(xq, uq, precision=lax.Precision.HIGHEST)
    return (jax.nn.silu(g) * u).astype(dtype)


def _swiglu_args(dtype, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((M, D)), dtype),
            jnp.asarray(rng.standard_normal((D, F)) / 8, dtype),
            jnp.asarray(rng.standard_normal((D, F)) / 8, dtype))


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("seed", [0, 1])
def test_swiglu_numerics_under_a_policy(dtype, seed):
    args = _swiglu_args(dtype, seed)
    compiled = mtia_jax.jit(mtia_jax.swiglu, chip="mtia450", precision=POLICY)
    got = np.asarray(compiled(*args), np.float32)
    reference = jax.jit(_swiglu_reference, static_argnums=(3, 4))
    np.testing.assert_array_equal(got, np.asarray(reference(*args, MX8, MX4), np.float32))
    # against float64 products of the fake-quantized operands: within the
    # final rounding to dtype
    xq, gq, uq = (np.asarray(fake_quantize(a, fmt, axis), np.float64)
                  for a, fmt, axis in zip(args, (MX8, MX4, MX4), (-1, 0, 0)))
    g, u = xq @ gq, xq @ uq
    exact = g / (1 + np.exp(-g)) * u
    rtol = 2.0 ** -8 if dtype == BF16 else 1e-5
    np.testing.assert_allclose(got, exact, rtol=rtol, atol=rtol * np.abs(exact).max() / 64)
    # the policy changed the result: the operands were rounded
    plain = np.asarray(jax.jit(mtia_jax.swiglu)(*args), np.float32)
    assert np.abs(got - plain).max() > 0.05


def test_swiglu_reads_its_operands_packed():
    bf16 = _compiled(mtia_jax.swiglu, *SWIGLU).cost
    mx = _compiled(mtia_jax.swiglu, *SWIGLU, precision=POLICY).cost
    (k16,), (kmx,) = kernels_with(bf16.kernels, "swiglu"), kernels_with(mx.kernels, "swiglu")
    out = M * F * 2
    assert k16.hbm_bytes == M * D * 2 + 2 * D * F * 2 + out
    x_packed = MXType("mx8").nbytes((M, D), -1)       # 1024 elements + 32 scales
    w_packed = MXType("mx4").nbytes((D, F), 0)        # 4096 bytes of nibbles + 256 scales
    assert (x_packed, w_packed) == (M * D + M * D // 32, D * F // 2 + D * F // 32)
    assert x_packed == packed_bytes(_type((M, D)), MX8, -1)
    assert w_packed == packed_bytes(_type((D, F)), MX4, 0)
    assert kmx.hbm_bytes == x_packed + 2 * w_packed + out
    assert kmx.hbm_bytes / k16.hbm_bytes == pytest.approx(13856 / 38912)
    # the floor counts the weights packed too
    assert mx.min_hbm_bytes == kmx.hbm_bytes and bf16.min_hbm_bytes == k16.hbm_bytes
    # and the products run at the MX8 rate (the wider of mx8 x mx4), not bf16
    assert kmx.compute_s < k16.compute_s


# ------------------------------------------------------------ moe_ffn

T, MD, MF, E, TOP_K = 8, 64, 32, 4, 2
MOE = (S((T, MD), F32), S((T, E), F32), S((E, MD, MF), F32), S((E, MD, MF), F32),
       S((E, MF, MD), F32))


def _moe(x, logits, wg, wu, wd):
    return mtia_jax.moe_ffn(x, logits, wg, wu, wd, top_k=TOP_K)


def test_moe_ffn_gets_the_policy_formats_when_its_expert_weights_are_parameters():
    op = _the(_compiled(_moe, *MOE, precision=POLICY).module, "moe_ffn")
    assert op.params["x_format"] == MX8 and op.params["w_format"] == MX4
    assert op.params["top_k"] == TOP_K
    op = _the(_compiled(_moe, *MOE).module, "moe_ffn")
    assert "x_format" not in op.params and "w_format" not in op.params
    # one expert weight computed in the program: no formats
    f = lambda x, logits, wg, wu, wd: _moe(x, logits, wg, wu * 0.5, wd)
    op = _the(_compiled(f, *MOE, precision=POLICY).module, "moe_ffn")
    assert "x_format" not in op.params and "w_format" not in op.params


def _moe_dense_reference(x, logits, wg, wu, wd):
    """Every token through its top-k experts, float64 products of the
    fake-quantized operands (weights in blocks along each product's K, the
    activations and the float32 hidden activation along their features)."""
    xq = np.asarray(fake_quantize(x, MX8, -1), np.float64)
    gq, uq, dq = (np.asarray(fake_quantize(w, MX4, -2), np.float64) for w in (wg, wu, wd))
    g, u = np.einsum("td,edf->tef", xq, gq), np.einsum("td,edf->tef", xq, uq)
    hidden = (g / (1 + np.exp(-g)) * u).astype(np.float32)          # (T, E, F)
    hq = np.asarray(fake_quantize(hidden, MX8, -1), np.float64)
    y = np.einsum("tef,efd->ted", hq, dq)                           # every expert's output
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    out = np.zeros((T, MD))
    for t in range(T):
        top = logits[t, chosen[t]].astype(np.float64)
        p = np.exp(top - top.max())
        p /= p.sum()
        out[t] = sum(weight * y[t, e] for weight, e in zip(p, chosen[t]))
    return out


def test_moe_ffn_numerics_under_a_policy():
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((T, MD)).astype(np.float32),
            rng.standard_normal((T, E)).astype(np.float32),
            *(rng.standard_normal(s.shape).astype(np.float32) / 8 for s in MOE[2:]))
    got = np.asarray(mtia_jax.jit(_moe, chip="mtia450", precision=POLICY)(*args))
    np.testing.assert_allclose(got, _moe_dense_reference(*args), rtol=1e-5, atol=1e-6)
    plain = np.asarray(jax.jit(_moe)(*args))
    assert np.abs(got - plain).max() > 0.05


def test_moe_ffn_reads_its_weights_packed():
    plain = kernels_with(_compiled(_moe, *MOE).cost.kernels, "moe_ffn")[0]
    mx = kernels_with(_compiled(_moe, *MOE, precision=POLICY).cost.kernels, "moe_ffn")[0]
    hit = expected_experts_hit(T, E, TOP_K) / E
    assert hit == pytest.approx(1 - 0.5 ** 8)
    logits, out = T * E * 4, T * MD * 4
    weights = 3 * E * MD * MF * 4
    assert plain.hbm_bytes == pytest.approx(T * MD * 4 + logits + hit * weights + out)
    x_packed = MXType("mx8").nbytes((T, MD), -1)
    w_packed = MXType("mx4").nbytes((E, MD, MF), -2)
    assert MXType("mx4").nbytes((E, MF, MD), -2) == w_packed == E * MD * MF // 2 + E * MF * 2
    assert mx.hbm_bytes == pytest.approx(x_packed + logits + hit * 3 * w_packed + out)
    assert mx.hbm_bytes < plain.hbm_bytes / 4


# ------------------------------------------------------------ flash_attention and the KV cache

B, TQ, N, KH, H, SKV = 2, 4, 4, 2, 64, 32
ATTN = (S((B, TQ, N, H), BF16), S((B, SKV, KH, H), BF16), S((B, SKV, KH, H), BF16))


def _attention(q, k, v):
    return mtia_jax.flash_attention(q, k, v)


def test_flash_attention_gets_kv_format_under_a_kv_cache_policy():
    op = _the(_compiled(_attention, *ATTN, precision=KV_POLICY).module, "flash_attention")
    assert op.params["kv_format"] == MX8
    op = _the(_compiled(_attention, *ATTN).module, "flash_attention")
    assert op.params.get("kv_format") is None
    # a weights/activations policy does not touch the KV cache
    op = _the(_compiled(_attention, *ATTN, precision=POLICY).module, "flash_attention")
    assert op.params.get("kv_format") is None
    both = mtia_jax.PrecisionPolicy(weights="mx4", kv_cache="mx6")
    op = _the(_compiled(_attention, *ATTN, precision=both).module, "flash_attention")
    assert op.params["kv_format"] == "mxfp6_e2m3"


def test_flash_attention_numerics_under_a_kv_cache_policy():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(s.shape), BF16) for s in ATTN)
    got = mtia_jax.jit(_attention, chip="mtia450", precision=KV_POLICY)(q, k, v)
    # keys and values held in mx8, blocks along the head dimension
    want = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, fake_quantize(k, MX8, -1), fake_quantize(v, MX8, -1)))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    plain = jax.jit(_attention)(q, k, v)
    assert np.abs(np.asarray(got, np.float32) - np.asarray(plain, np.float32)).max() > 0.01


def test_kv_cache_policy_reads_keys_and_values_packed():
    plain = kernels_with(_compiled(_attention, *ATTN).cost.kernels, "flash_attention")[0]
    mx = kernels_with(_compiled(_attention, *ATTN, precision=KV_POLICY).cost.kernels,
                      "flash_attention")[0]
    q = out = B * TQ * N * H * 2
    kv = B * SKV * KH * H * 2
    assert plain.hbm_bytes == q + 2 * kv + out
    kv_packed = MXType("mx8").nbytes((B, SKV, KH, H), -1)
    assert kv_packed == kv // 2 + B * SKV * KH * (H // 32)
    assert mx.hbm_bytes == q + 2 * kv_packed + out
    assert mx.hbm_bytes < plain.hbm_bytes
