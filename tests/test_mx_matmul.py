"""mx_matmul: MX block dot products (OCP MX v1.0 §6.1-6.2), its rules and its cost."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from mtia_jax import chips, mx
from mtia_jax.primitives.mx_matmul import mx_matmul, mx_matmul_p
from lowering import gemm_shapes
from runtime.cost_model import kernel_cost
from runtime.op_work import hbm_bytes, work_of

try:  # tests/ as a package or as a plain directory on sys.path
    from . import mx_reference as ref
except ImportError:
    import mx_reference as ref

EPS32 = float(np.finfo(np.float32).eps)
PAIRS = [("mx8", "mx4"), ("mxfp6_e3m2", "mxint8"), ("mxfp8_e5m2", None), (None, "mx6"),
         ("mx4", "mx4")]


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _deq(x, fmt, axis):
    """float64 values an operand contributes: dequantized, or as it is."""
    if fmt is None:
        return np.asarray(x, np.float64)
    return np.asarray(mx.dequantize(mx.quantize(x, fmt, axis=axis)), np.float64)


def _fp32_bound(a64, b64):
    """Error bound of a float32 dot product of length K with a final rounding:
    K * eps * sum_k |a_k b_k| (gamma_K with u = eps / 2, with margin)."""
    k = a64.shape[-1]
    return (k + 1) * EPS32 * (np.abs(a64) @ np.abs(b64)) + np.finfo(np.float32).tiny


def _block_formula(a, b, a_fmt, b_fmt, block=32):
    """Independent NumPy: C = sum_j X_j(a) X_j(b) sum_i P_i(a) P_i(b) (float64)."""
    ea, sa = ref.quantize_ref(np.asarray(a), ref_name(a_fmt), axis=-1, block_size=block)
    eb, sb = ref.quantize_ref(np.asarray(b), ref_name(b_fmt), axis=0, block_size=block)
    pa, pb = ref.element_values_ref(ea, ref_name(a_fmt)), ref.element_values_ref(eb, ref_name(b_fmt))
    k = a.shape[-1]
    out = np.zeros((a.shape[0], b.shape[1]))
    for j in range(-(-k // block)):
        blk = slice(j * block, min((j + 1) * block, k))
        xa = np.ldexp(1.0, sa[:, j].astype(np.int64) - 127)[:, None]
        xb = np.ldexp(1.0, sb[j, :].astype(np.int64) - 127)[None, :]
        out += xa * xb * (pa[:, blk] @ pb[blk, :])
    return out, pa, pb


def ref_name(fmt):
    return mx.get_format(fmt).name


# ------------------------------------------------------------ numerics

@pytest.mark.parametrize("a_fmt,b_fmt", PAIRS)
def test_equals_dequantize_then_fp32_matmul(a_fmt, b_fmt):
    a, b = _normal(0, (2, 5, 96), 3.0), _normal(1, (96, 7), 0.1)
    y = mx_matmul(a, b, a_format=a_fmt, b_format=b_fmt)
    assert y.shape == (2, 5, 7) and y.dtype == jnp.float32
    a64, b64 = _deq(a, a_fmt, -1), _deq(b, b_fmt, 0)
    exact = a64 @ b64
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - exact), _fp32_bound(a64, b64))
    if a_fmt is not None and b_fmt is not None:  # quantization really happened
        assert not np.allclose(np.asarray(y), np.asarray(a @ b), rtol=1e-6)


@pytest.mark.parametrize("a_fmt,b_fmt", [("mx8", "mx4"), ("mxfp6_e2m3", "mxint8"),
                                         ("mxfp8_e5m2", "mxfp6_e3m2")])
def test_matches_numpy_block_formula(a_fmt, b_fmt):
    # K = 80: two full blocks and a zero-padded partial one; rows of very
    # different magnitudes get different block scales
    k = 80
    a = np.random.default_rng(2).standard_normal((6, k)).astype(np.float32)
    a *= np.float32(2.0) ** np.arange(-6, 6, 2, dtype=np.float32)[:, None]
    b = np.random.default_rng(3).standard_normal((k, 9)).astype(np.float32) * 0.01
    y = np.asarray(mx_matmul(jnp.asarray(a), jnp.asarray(b), a_format=a_fmt, b_format=b_fmt),
                   np.float64)
    exact, pa, pb = _block_formula(a, b, a_fmt, b_fmt)
    a64 = _deq(jnp.asarray(a), a_fmt, -1)
    b64 = _deq(jnp.asarray(b), b_fmt, 0)
    np.testing.assert_allclose(a64 @ b64, exact, rtol=1e-12, atol=0)  # the two references agree
    np.testing.assert_array_less(np.abs(y - exact), _fp32_bound(a64, b64))


def test_out_dtype_casts_the_fp32_result():
    a, b = _normal(4, (4, 64)), _normal(5, (64, 8))
    y32 = mx_matmul(a, b, a_format="mx8", b_format="mx4")
    y16 = mx_matmul(a, b, a_format="mx8", b_format="mx4", out_dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))


def test_bf16_inputs_are_quantized_from_their_exact_values():
    a, b = _normal(6, (4, 64)).astype(jnp.bfloat16), _normal(7, (64, 8)).astype(jnp.bfloat16)
    y = mx_matmul(a, b, a_format="mx8", b_format="mx4")
    same = mx_matmul(a.astype(jnp.float32), b.astype(jnp.float32), a_format="mx8", b_format="mx4")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(same))


def test_prequantized_operands_equal_quantizing_in_the_op():
    a, b = _normal(8, (3, 4, 64)), _normal(9, (64, 10))
    aq, bq = mx.quantize(a, "mx8", axis=-1), mx.quantize(b, "mx4", axis=0)
    want = np.asarray(mx_matmul(a, b, a_format="mx8", b_format="mx4"))
    np.testing.assert_array_equal(np.asarray(mx_matmul(a, bq, a_format="mx8")), want)
    np.testing.assert_array_equal(np.asarray(mx_matmul(aq, bq)), want)
    np.testing.assert_array_equal(np.asarray(mx_matmul(aq, b, b_format="mx4", a_format="mx8")), want)
    # weights quantized once, bound as elements and scales
    jaxpr = jax.make_jaxpr(lambda x, w: mx_matmul(x, w, a_format="mx8"))(a, bq)
    (eqn,) = jaxpr.eqns
    assert eqn.primitive is mx_matmul_p and len(eqn.invars) == 3
    assert eqn.params["b_packed"] and eqn.params["b_format"] == "mxfp4_e2m1"
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, w: mx_matmul(x, w, a_format="mx8"))(a, bq)), want)


def test_batched_b_is_one_product_per_batch_entry():
    a, b = _normal(10, (3, 4, 64)), _normal(11, (3, 64, 5))
    y = mx_matmul(a, b, a_format="mx6", b_format="mx8")
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(y[i]),
                                      np.asarray(mx_matmul(a[i], b[i], a_format="mx6", b_format="mx8")))
    bq = mx.quantize(b, "mx8", axis=1)
    np.testing.assert_array_equal(np.asarray(mx_matmul(a, bq, a_format="mx6")), np.asarray(y))


def test_nan_scale_block_poisons_only_its_rows():
    a = np.ones((3, 64), np.float32)
    a[1, 40] = np.nan
    y = np.asarray(mx_matmul(jnp.asarray(a), _normal(12, (64, 4)), a_format="mx8", b_format="mx8"))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


# ------------------------------------------------------------ errors

@pytest.mark.parametrize("a_shape,b_shape,match", [
    ((4, 64), (32, 8), "contraction sizes differ"),
    ((64,), (64, 8), "rank >= 2"),
    ((4, 64), (64,), "rank >= 2"),
    ((2, 4, 64), (3, 64, 8), "same batch dims"),
])
def test_mismatched_shapes_raise_value_errors(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        mx_matmul(jnp.ones(a_shape), jnp.ones(b_shape), a_format="mx8", b_format="mx8")


def test_input_errors_name_the_argument():
    a, b = jnp.ones((4, 64)), jnp.ones((64, 8))
    with pytest.raises(TypeError, match="a must be a floating-point array.*int32"):
        mx_matmul(jnp.ones((4, 64), jnp.int32), b, a_format="mx8")
    with pytest.raises(ValueError, match="b_format.*unknown MX format 'mx5'"):
        mx_matmul(a, b, b_format="mx5")
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        mx_matmul(a, b, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="quantized along the contraction axis.*axis=0"):
        mx_matmul(a, mx.quantize(b, "mx4", axis=1))
    with pytest.raises(ValueError, match="quantized along the contraction axis.*axis=1"):
        mx_matmul(mx.quantize(a, "mx4", axis=0), b)
    with pytest.raises(ValueError, match="b is an MXArray in mxfp4_e2m1"):
        mx_matmul(a, mx.quantize(b, "mx4", axis=0), b_format="mx8")
    with pytest.raises(ValueError, match="block sizes differ"):
        mx_matmul(mx.quantize(a, "mx8", block_size=16), mx.quantize(b, "mx4", axis=0))


# ------------------------------------------------------------ autodiff

def _fq_matmul(a, b, a_fmt, b_fmt):
    a = mx.fake_quantize(a, a_fmt, axis=-1) if a_fmt else a
    b = mx.fake_quantize(b, b_fmt, axis=0) if b_fmt else b
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("a_fmt,b_fmt", [("mx8", "mx4"), (None, "mx6")])
def test_grad_is_straight_through_like_fake_quantize(a_fmt, b_fmt):
    a, b, c = _normal(13, (2, 4, 64)), _normal(14, (64, 6)), _normal(15, (2, 4, 6))
    loss = lambda f: (lambda a, b: jnp.sum(f(a, b) * c))
    got = jax.grad(loss(lambda a, b: mx_matmul(a, b, a_format=a_fmt, b_format=b_fmt)), (0, 1))(a, b)
    want = jax.grad(loss(lambda a, b: _fq_matmul(a, b, a_fmt, b_fmt)), (0, 1))(a, b)
    for g, w in zip(got, want):
        # both are float32 products of the same values: the same up to summation order
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_jvp_and_vjp_are_transposes_of_each_other():
    # <ct, J t> == <J^T ct, t>: the custom JVP transposes correctly under grad
    a, b = _normal(16, (4, 64)), _normal(17, (64, 6))
    ta, tb, ct = _normal(18, (4, 64)), _normal(19, (64, 6)), _normal(20, (4, 6))
    f = lambda a, b: mx_matmul(a, b, a_format="mx8", b_format="mx4")
    _, jt = jax.jvp(f, (a, b), (ta, tb))
    _, vjp = jax.vjp(f, a, b)
    ga, gb = vjp(ct)
    lhs = float(jnp.vdot(ct, jt))
    rhs = float(jnp.vdot(ga, ta) + jnp.vdot(gb, tb))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_prequantized_weights_get_no_gradient_but_activations_do():
    a, b = _normal(21, (4, 64)), _normal(22, (64, 6))
    bq = mx.quantize(b, "mx4", axis=0)
    g = jax.grad(lambda a: mx_matmul(a, bq, a_format="mx8").sum())(a)
    want = jax.grad(lambda a: _fq_matmul(a, b, "mx8", "mx4").sum())(a)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ batching

def _loop(f, *batched):
    return np.stack([np.asarray(f(*xs)) for xs in zip(*batched)])


def _keeps_primitive(f, *args):
    prims = {e.primitive for e in jax.make_jaxpr(f)(*args).eqns}
    return mx_matmul_p in prims


@pytest.mark.parametrize("case", ["a", "a_batched_b", "b", "b_batched", "both", "both_batched_b"])
def test_vmap_keeps_the_primitive_and_matches_a_loop(case):
    fmt = dict(a_format="mx8", b_format="mx4")
    f = lambda a, b: mx_matmul(a, b, **fmt)
    a2, b2 = _normal(23, (3, 4, 64)), _normal(24, (64, 5))      # vmapped axis 0 of a2
    a3, b3 = _normal(25, (3, 2, 4, 64)), _normal(26, (3, 2, 64, 5))
    args, in_axes = {
        "a": ((a2, b2[:, :5]), (0, None)),
        "a_batched_b": ((a3[:, 0].reshape(3, 1, 4, 64).repeat(2, 1), b3[0]), (0, None)),
        "b": ((a2[0], _normal(27, (64, 3, 5))), (None, 1)),
        "b_batched": ((a3[0], b3), (None, 0)),
        "both": ((_normal(28, (3, 2, 4, 64)), _normal(29, (3, 64, 5))), (0, 0)),
        "both_batched_b": ((a3, b3), (0, 0)),
    }[case]
    got = np.asarray(jax.vmap(f, in_axes)(*args))
    moved = [jnp.moveaxis(x, d, 0) if d is not None else [x] * 3 for x, d in zip(args, in_axes)]
    np.testing.assert_array_equal(got, _loop(f, *moved))
    assert _keeps_primitive(jax.vmap(f, in_axes), *args)


def test_vmap_over_prequantized_weights():
    a, ws = _normal(30, (4, 64)), _normal(31, (3, 64, 5))
    wq = jax.vmap(lambda w: mx.quantize(w, "mx4", axis=0))(ws)
    got = jax.vmap(lambda w: mx_matmul(a, w, a_format="mx8"))(wq)
    want = np.stack([np.asarray(mx_matmul(a, w, a_format="mx8", b_format="mx4")) for w in ws])
    np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------ compiler and cost

def test_mtia_jit_runs_it_as_one_mx_matmul_kernel_bitwise_like_jax_jit():
    a, b = _normal(32, (2, 4, 64)), _normal(33, (64, 8))
    bq = mx.quantize(b, "mx4", axis=0)
    f = lambda a, w: jax.nn.relu(mx_matmul(a, w, a_format="mx8"))
    want = np.asarray(jax.jit(f)(a, bq))
    for mode in ("graph", "eager"):
        compiled = mtia_jax.jit(f, mode=mode).lower(a, bq).compile()
        np.testing.assert_array_equal(np.asarray(compiled(a, bq)), want)
    text = compiled.as_text()
    assert "mx_matmul(" in text and "b_format=mxfp4_e2m1" in text and "tile=" in text


def _op(fn, *args, chip="mtia450"):
    lowered = mtia_jax.jit(fn, chip=chip).lower(*args)
    (op,) = [o for o in lowered.module.ops if o.kind == "mx_matmul"]
    return op


M, K, N = 8, 4096, 14336


def _decode_op(a_fmt, b_fmt, prequantized=False):
    a = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    if prequantized:
        b = mx.MXArray(jax.ShapeDtypeStruct((K, N), mx.get_format(b_fmt).storage_dtype),
                       jax.ShapeDtypeStruct((K // 32, N), mx.SCALE_DTYPE), b_fmt, axis=0)
        return _op(lambda a, w: mx_matmul(a, w, a_format=a_fmt), a, b)
    b = jax.ShapeDtypeStruct((K, N), jnp.bfloat16)
    return _op(lambda a, w: mx_matmul(a, w, a_format=a_fmt, b_format=b_fmt), a, b)


@pytest.mark.parametrize("prequantized", [False, True])
def test_work_counts_flops_and_packed_bytes_by_hand(prequantized):
    op = _decode_op("mx8", "mx4", prequantized)
    work = work_of(op)
    assert work.flops == 2 * M * N * K and work.engine == "matrix"
    a_bytes = M * K * 1 + M * (K // 32)                 # mx8: 1 B/element + a scale byte per 32
    b_bytes = K * N // 2 + (K // 32) * N                # mx4: 0.5 B/element
    assert hbm_bytes(op) == a_bytes + b_bytes + M * N * 4
    assert work.dtype == "mx8" and work.unit == "mx_matmul"


def test_unquantized_operand_is_charged_at_its_dtype_size_and_rate():
    op = _decode_op(None, "mx6")
    work = work_of(op)
    assert hbm_bytes(op) == M * K * 2 + K * N * 6 // 8 + (K // 32) * N + M * N * 4
    assert work.dtype == "bf16"  # the wider operand sets the rate


@pytest.mark.parametrize("chip_name,a_fmt,b_fmt,rate_class", [
    ("mtia450", "mx8", "mx4", "mx8"),     # mixed: the slower (MX8) rate
    ("mtia450", "mx4", "mx4", "mx4"),
    ("mtia400", "mx6", "mx4", "mx6"),
    ("mtia300", "mx4", "mx4", "mx6"),     # no MX4 rate listed: falls back to the MX6 rate
    ("h100", "mx4", "mx4", "fp8"),        # no MX unit: the FP8 tensor-core rate
    ("mtia_v1", "mx8", "mx4", "bf16"),    # no fp8/MX datapath at all
])
def test_kernel_time_uses_the_rate_of_the_slower_operand_class(chip_name, a_fmt, b_fmt, rate_class):
    chip = chips.get(chip_name)
    op = _decode_op(a_fmt, b_fmt)
    cost = kernel_cost(op, "0", chip)   # no tile attribute: full PE utilisation
    work = work_of(op)
    # at the chip's achievable fractions of peak (h100: fitted, docs/validation.md)
    assert cost.compute_s == pytest.approx(
        work.flops / (chip.peak_flops[rate_class] * chip.matmul_efficiency), rel=1e-12)
    assert cost.hbm_s == pytest.approx(hbm_bytes(op) / (chip.hbm_bandwidth * chip.hbm_efficiency),
                                       rel=1e-12)
    assert cost.time_s == pytest.approx(max(cost.compute_s, cost.hbm_s) + chip.kernel_launch_s)


def test_tiling_sees_packed_operands():
    op = _decode_op("mx8", "mx4")
    shape = gemm_shapes.mx_matmul_gemm_shape(op)
    work = work_of(op)
    assert (shape.batch, shape.m, shape.n, shape.k) == (1, M, N, K) and shape.flops == work.flops
    assert shape.lhs_bytes + shape.rhs_bytes + shape.out_bytes == hbm_bytes(op)
    assert chips.get("mtia450").matmul_peak(shape.dtype) == chips.get("mtia450").peak_flops["mx8"]
    compiled = mtia_jax.jit(lambda a, w: mx_matmul(a, w, a_format="mx8", b_format="mx4"),
                            chip="mtia450").lower(jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
                                                  jax.ShapeDtypeStruct((K, N), jnp.bfloat16)).compile()
    (kernel,) = compiled.cost.kernels
    tile = compiled.module.ops[0].attrs["tile"]
    assert kernel.hbm_bytes == hbm_bytes(op) + tile.extra_hbm_bytes
