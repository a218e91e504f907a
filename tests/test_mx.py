"""Tests for mtia_jax.mx (OCP Microscaling formats v1.0)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtia_jax import mx

try:  # tests/ as a package or as a plain directory on sys.path
    from . import mx_reference as ref
except ImportError:
    import mx_reference as ref

ALL = list(mx.format_names())
FP = [f for f in ALL if f != "mxint8"]


def _bits(q):
    return np.asarray(q.element_bits()), np.asarray(q.scale_bits())


def _one_block(fmt, values, block_size=32):
    """Quantize a single zero-padded block; return (element bits, scale exponent)."""
    x = np.zeros(block_size, np.float32)
    x[: len(values)] = values
    q = mx.quantize(x, fmt, block_size=block_size)
    eb, sb = _bits(q)
    return q, eb[: len(values)], int(sb[0]) - 127


def _values(q):
    """Element values P_i (without scale) as float64."""
    return ref.element_values_ref(np.asarray(q.element_bits()), q.format.name)


def _assert_same_f32(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    keep = ~np.isnan(a)
    np.testing.assert_array_equal(a.view(np.uint32)[keep], b.view(np.uint32)[keep])


def _assert_matches_reference(x, fmt, axis=-1, block_size=32, q=None):
    if q is None:
        q = mx.quantize(x, fmt, axis=axis, block_size=block_size)
    eb, sb = _bits(q)
    reb, rsb = ref.quantize_ref(x, fmt, axis=axis, block_size=block_size)
    np.testing.assert_array_equal(sb, rsb)
    ax = axis % np.ndim(x)
    care = np.take(np.repeat(rsb != 255, block_size, axis=ax),
                   np.arange(np.shape(x)[ax]), axis=ax)
    assert eb.shape == reb.shape
    np.testing.assert_array_equal(np.where(care, eb, 0), np.where(care, reb, 0))
    _assert_same_f32(mx.dequantize(q), ref.dequantize_ref(eb, sb, fmt, ax, block_size))


# --------------------------------------------------------------------------
# format catalogue, MXType
# --------------------------------------------------------------------------

EXPECTED = {  # name: (element dtype, bits, emax, max normal)
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8, 8, 448.0),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 8, 15, 57344.0),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 6, 4, 28.0),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 6, 2, 7.5),
    "mxfp4_e2m1": (ml_dtypes.float4_e2m1fn, 4, 2, 6.0),
    "mxint8": (np.int8, 8, 0, 127 / 64),
}


@pytest.mark.parametrize("name", ALL)
def test_format_parameters_match_the_ocp_table(name):
    f = mx.get_format(name)
    dtype, bits, emax, max_normal = EXPECTED[name]
    assert f.name == name and str(f) == name
    assert f.element_dtype == np.dtype(dtype)
    assert f.element_bits == bits and f.emax == emax and f.max_normal == max_normal
    assert mx.FORMATS[name] is f
    assert mx.get_format(f) is f
    if name != "mxint8":
        fi = ml_dtypes.finfo(dtype)
        assert float(fi.max) == f.max_normal
        assert fi.nmant == f.mantissa_bits
        assert float(fi.smallest_normal) == f.min_normal
        assert float(fi.smallest_subnormal) == f.min_subnormal
        # max_code is the bit pattern of +max normal
        assert np.array([f.max_code], np.uint8).view(dtype).astype(np.float32)[0] == max_normal
    assert ref.emax(name) == emax


def test_format_names_and_aliases():
    assert mx.format_names() == (
        "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8")
    assert mx.get_format("mx8") is mx.FORMATS["mxfp8_e4m3"]
    assert mx.get_format("mx6") is mx.FORMATS["mxfp6_e2m3"]
    assert mx.get_format("mx4") is mx.FORMATS["mxfp4_e2m1"]
    assert mx.get_format(" MXFP4_E2M1 ") is mx.FORMATS["mxfp4_e2m1"]
    assert mx.get_format(mx.MXType("mx6")) is mx.FORMATS["mxfp6_e2m3"]


@pytest.mark.parametrize("bad", ["mxfp3", "", "fp8", 4, None])
def test_unknown_format_lists_names(bad):
    with pytest.raises(ValueError) as info:
        mx.get_format(bad)
    msg = str(info.value)
    for name in list(mx.FORMATS) + ["mx8", "mx6", "mx4"]:
        assert name in msg
    with pytest.raises(ValueError):
        mx.quantize(np.ones(32, np.float32), bad)


def test_mxtype_names_bits_per_element_and_hash():
    t = mx.MXType(mx.get_format("mx4"))
    assert str(t) == "mxfp4_e2m1[32]"
    assert t.bits_per_element == 4.25
    assert mx.MXType("mx4") == t and hash(mx.MXType("mx4")) == hash(t)
    assert {t: 1}[mx.MXType("mxfp4_e2m1", 32)] == 1
    t16 = mx.MXType("mxint8", 16)
    assert str(t16) == "mxint8[16]" and t16.bits_per_element == 8.5
    assert mx.MXType("mx8").bits_per_element == 8.25
    assert mx.MXType("mx6").bits_per_element == 6.25
    assert t16 != mx.MXType("mxint8")
    with pytest.raises(AttributeError):
        t.block_size = 16
    with pytest.raises(ValueError):
        mx.MXType("mx4", 0)
    assert t.scale_shape((4, 64)) == (4, 2)
    assert t.scale_shape((70, 3), axis=0) == (3, 3)
    assert t.nbytes((4, 64)) == 136


# --------------------------------------------------------------------------
# hand-checked vectors
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, amax, shared_exp, stored, code", [
    ("mxfp4_e2m1", 3.0, -1, 6.0, 0x7),
    ("mxfp4_e2m1", 7.0, 0, 6.0, 0x7),      # saturated
    ("mxfp8_e4m3", 500.0, 0, 448.0, 0x7E),  # saturated, not NaN
    ("mxfp8_e4m3", 1.0, -8, 256.0, 0x78),
    ("mxint8", 1.5, 0, 1.5, 96),
    ("mx4", -3.0, -1, -6.0, 0xF),
    ("mxfp8_e5m2", 1.0, -15, 32768.0, 0x78),
    ("mxfp6_e3m2", 1.0, -4, 16.0, 0x1C),
    ("mxfp6_e2m3", 1.0, -2, 4.0, 0x18),
])
def test_worked_examples_encode_exactly(fmt, amax, shared_exp, stored, code):
    q, eb, exp = _one_block(fmt, [amax, amax / 4])
    assert exp == shared_exp
    assert eb[0] == code
    assert _values(q)[0] == stored
    assert float(mx.dequantize(q)[0]) == stored * 2.0**shared_exp


# (fmt, amax fixing shared_exp = 0, [(input, expected element value)])
TIES = [
    ("mxfp4_e2m1", 4.0, [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0),
                         (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (-5.0, -4.0),
                         (-0.25, -0.0), (0.2500001, 0.5)]),
    ("mxfp6_e2m3", 4.0, [(0.0625, 0.0), (0.1875, 0.25), (0.3125, 0.25),
                         (1.0625, 1.0), (1.1875, 1.25), (7.25, 7.0), (-1.0625, -1.0)]),
    ("mxfp6_e3m2", 16.0, [(0.03125, 0.0), (0.09375, 0.125), (1.125, 1.0),
                          (1.375, 1.5), (26.0, 24.0), (-1.375, -1.5)]),
    ("mxfp8_e4m3", 256.0, [(17.0, 16.0), (19.0, 20.0), (2.0**-10, 0.0),
                           (3 * 2.0**-10, 2.0**-8), (5 * 2.0**-10, 2.0**-8),
                           (1.0625, 1.0), (1.1875, 1.25), (-19.0, -20.0)]),
    ("mxfp8_e5m2", 32768.0, [(1.125, 1.0), (1.375, 1.5), (2.0**-17, 0.0),
                             (5 * 2.0**-17, 2 * 2.0**-16), (7 * 2.0**-17, 4 * 2.0**-16),
                             (1.0 + 2.0**-20, 1.0)]),
    ("mxint8", 1.0, [(1.5 / 64, 2 / 64), (2.5 / 64, 2 / 64), (-0.5 / 64, 0.0),
                     (0.5 / 64, 0.0), (-2.5 / 64, -2 / 64), (3.5 / 64, 4 / 64)]),
]


@pytest.mark.parametrize("fmt, amax, cases", TIES, ids=[t[0] for t in TIES])
def test_round_half_to_even(fmt, amax, cases):
    inputs = [amax] + [c[0] for c in cases]
    q, eb, exp = _one_block(fmt, inputs)
    assert exp == 0
    got = _values(q)[1 : len(inputs)]
    want = np.array([c[1] for c in cases])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    _assert_matches_reference(np.array(inputs, np.float32), fmt)


@pytest.mark.parametrize("fmt, big", [
    ("mxfp8_e4m3", 496.0), ("mxfp8_e4m3", 479.0), ("mxfp8_e5m2", 65000.0),
    ("mxfp6_e3m2", 31.0), ("mxfp6_e2m3", 7.9), ("mxfp4_e2m1", 7.99),
    ("mxint8", 1.999),
])
def test_values_past_max_normal_saturate(fmt, big):
    f = mx.get_format(fmt)
    q, eb, exp = _one_block(fmt, [big, -big, np.nextafter(np.float32(big), np.float32(0))])
    assert exp == 0
    v = _values(q)
    assert v[0] == f.max_normal and v[1] == -f.max_normal and v[2] == f.max_normal
    assert np.all(np.isfinite(np.asarray(mx.dequantize(q))))


@pytest.mark.parametrize("fmt", FP)
def test_subnormal_elements_are_kept_and_rounded_to_nearest(fmt):
    f = mx.get_format(fmt)
    amax = 2.0**f.emax  # shared exponent 0
    sub = f.min_subnormal
    inputs = [amax, sub, 2 * sub, -sub, 0.4 * sub, 0.6 * sub, f.min_normal - sub]
    q, eb, exp = _one_block(fmt, inputs)
    assert exp == 0
    want = [amax, sub, 2 * sub, -sub, 0.0, sub, f.min_normal - sub]
    np.testing.assert_array_equal(_values(q)[: len(want)], want)
    assert eb[1] == 1 and eb[3] == (1 << f.sign_shift) | 1
    np.testing.assert_array_equal(np.asarray(mx.dequantize(q))[: len(want)], want)


@pytest.mark.parametrize("fmt", ALL)
def test_float32_subnormal_inputs(fmt):
    # amax is an fp32 subnormal: scale 2^-127 (byte 0), elements x * 2^127 kept exactly
    inputs = np.array([2.0**-130, -(2.0**-131), 2.0**-149, 3 * 2.0**-133], np.float32)
    q, eb, exp = _one_block(fmt, inputs)
    assert exp == -127
    _assert_matches_reference(np.pad(inputs, (0, 28)), fmt)
    want = ref.quantize_ref(np.pad(inputs, (0, 28)), fmt)[0][:4]
    np.testing.assert_array_equal(eb, want)
    if fmt == "mxfp8_e4m3":
        np.testing.assert_array_equal(_values(q)[:4], [2.0**-3, -(2.0**-4), 0.0, 3 * 2.0**-6])
        np.testing.assert_array_equal(np.asarray(mx.dequantize(q))[:4],
                                      np.array([2.0**-130, -(2.0**-131), 0.0, 3 * 2.0**-133],
                                               np.float32))


@pytest.mark.parametrize("fmt", ALL)
def test_a_nan_makes_its_whole_block_nan(fmt):
    x = np.ones((3, 32), np.float32)
    x[1, 5] = np.nan
    x[1, 6] = np.inf
    q = mx.quantize(x, fmt)
    eb, sb = _bits(q)
    assert sb.tolist() == [[127 - mx.get_format(fmt).emax], [255], [127 - mx.get_format(fmt).emax]]
    d = np.asarray(mx.dequantize(q))
    assert np.all(np.isnan(d[1]))
    np.testing.assert_array_equal(d[[0, 2]], 1.0)
    assert np.isnan(np.asarray(mx.fake_quantize(x, fmt))[1]).all()
    assert np.isnan(np.asarray(mx.dequantize(q, jnp.bfloat16), np.float32)[1]).all()


@pytest.mark.parametrize("fmt", ALL)
def test_infinities_saturate_to_max_normal(fmt):
    f = mx.get_format(fmt)
    x = np.zeros(64, np.float32)
    x[0], x[1], x[2] = np.inf, -np.inf, 1.0
    x[32], x[33] = -np.inf, 2.0**90
    q = mx.quantize(x, fmt)
    eb, sb = _bits(q)
    assert sb.tolist() == [min(128 - f.emax, 127) + 127] * 2
    v = _values(q)
    assert v[0] == f.max_normal and v[1] == -f.max_normal and v[32] == -f.max_normal
    assert v[2] == 0.0 and v[33] == 0.0
    d = np.asarray(mx.dequantize(q))
    # max_normal * 2^(128 - emax) >= 2^128 overflows float32 for the FP formats
    # (their max normal has mantissa > 1), so +-Inf round-trips to +-Inf;
    # MXINT8 (127/64 * 2^127) stays finite.
    top = np.float32(f.max_normal * 2.0 ** min(128 - f.emax, 127)) if f.is_int else np.inf
    assert d[0] == top and d[1] == -top and d[32] == -top
    assert np.all(np.isfinite(d[2:32])) and np.all(np.isfinite(d[33:]))
    _assert_matches_reference(x, fmt)


@pytest.mark.parametrize("fmt", ALL)
def test_zero_and_negative_zero_blocks(fmt):
    x = np.zeros((2, 32), np.float32)
    x[1] = -0.0
    q = mx.quantize(x, fmt)
    eb, sb = _bits(q)
    assert sb.tolist() == [[0], [0]]
    assert np.all(eb[0] == 0)
    d = np.asarray(mx.dequantize(q))
    assert np.all(d == 0)
    assert not np.signbit(d[0]).any()
    if fmt == "mxint8":
        assert np.all(eb[1] == 0)  # int8 has no -0
    else:
        assert np.all(eb[1] == 1 << mx.get_format(fmt).sign_shift)
        assert np.signbit(d[1]).all()
        assert np.signbit(np.asarray(mx.fake_quantize(x, fmt))[1]).all()


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("n", [1, 33, 70])
def test_non_multiple_lengths(fmt, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((3, n)) * np.exp2(rng.integers(-20, 20, (3, n)))).astype(np.float32)
    x[:, -1] = 1e4 * (1 + np.arange(3))  # the partial last block has its own amax
    q = mx.quantize(x, fmt)
    assert q.shape == (3, n) and q.elements.shape == (3, n)
    assert q.scales.shape == (3, math.ceil(n / 32))
    assert q.scales.dtype == np.dtype(ml_dtypes.float8_e8m0fnu)
    assert q.elements.dtype == mx.get_format(fmt).storage_dtype
    _assert_matches_reference(x, fmt, q=q)
    if n == 1:
        return
    # the padding does not change the last block: same as quantizing it alone
    tail = x[:, (n - 1) // 32 * 32 :]
    qt = mx.quantize(tail, fmt)
    np.testing.assert_array_equal(_bits(qt)[1][:, 0], _bits(q)[1][:, -1])


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_every_axis_of_3d(fmt, axis):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((40, 3, 35)) * np.exp2(rng.integers(-8, 8, (40, 3, 35)))
         ).astype(np.float32)
    q = mx.quantize(x, fmt, axis=axis)
    ax = axis % 3
    assert q.axis == ax
    expect = list(x.shape)
    expect[ax] = math.ceil(x.shape[ax] / 32)
    assert q.scales.shape == tuple(expect)
    _assert_matches_reference(x, fmt, axis=axis, q=q)
    if fmt == "mxfp8_e4m3":  # same as quantizing the transposed array along its last axis
        qt = mx.quantize(np.moveaxis(x, ax, -1), fmt)
        np.testing.assert_array_equal(np.moveaxis(_bits(q)[0], ax, -1), _bits(qt)[0])
        np.testing.assert_array_equal(np.moveaxis(_bits(q)[1], ax, -1), _bits(qt)[1])


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_input(fmt, dtype):
    rng = np.random.default_rng(3)
    x32 = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    x32[0, 0] = 2.0**-133 if dtype == jnp.bfloat16 else 2.0**-24  # subnormal in dtype
    x32[0, 1:32] = 0
    xh = jnp.asarray(x32).astype(dtype)
    xf = np.asarray(xh.astype(jnp.float32))
    assert xf[0, 0] != 0
    q = mx.quantize(xh, fmt)
    _assert_matches_reference(xf, fmt, q=q)
    y = mx.fake_quantize(xh, fmt)
    assert y.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(y.astype(jnp.float32)),
        np.asarray(mx.dequantize(q).astype(dtype).astype(jnp.float32)))
    assert mx.dequantize(q, dtype).dtype == dtype


def test_numpy_and_jax_inputs_agree():
    x = np.linspace(-5, 5, 96, dtype=np.float32).reshape(3, 32)
    for fmt in ALL:
        a, b = mx.quantize(x, fmt), mx.quantize(jnp.asarray(x), fmt)
        np.testing.assert_array_equal(_bits(a)[0], _bits(b)[0])
        np.testing.assert_array_equal(_bits(a)[1], _bits(b)[1])


# --------------------------------------------------------------------------
# MXArray container
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, shape, axis, nbytes", [
    ("mx4", (4, 64), -1, 4 * 64 // 2 + 4 * 2),             # 136
    ("mx6", (3, 70), -1, math.ceil(210 * 6 / 8) + 3 * 3),    # 158 + 9
    ("mxint8", (2, 33, 5), 1, 330 + 2 * 2 * 5),              # 350
    ("mx8", (32,), 0, 32 + 1),
    ("mxfp4_e2m1", (3,), 0, 2 + 1),                          # 1.5 bytes -> 2
    ("mxfp8_e5m2", (64, 2), 0, 128 + 4),
])
def test_shapes_and_nbytes(fmt, shape, axis, nbytes):
    q = mx.quantize(np.ones(shape, np.float32), fmt, axis=axis)
    assert q.nbytes == nbytes
    assert q.dtype == mx.MXType(fmt) and q.dtype.nbytes(shape, axis) == nbytes
    assert q.shape == shape and q.ndim == len(shape) and q.size == math.prod(shape)
    ax = axis % len(shape)
    assert q.scales.shape == shape[:ax] + (math.ceil(shape[ax] / 32),) + shape[ax + 1 :]
    assert q.num_blocks == math.ceil(shape[ax] / 32)
    r = repr(q)
    assert str(q.dtype) in r and str(shape) in r


def test_block_size_option():
    x = np.arange(48, dtype=np.float32) - 20
    q = mx.quantize(x, "mx6", block_size=16)
    assert q.scales.shape == (3,) and q.block_size == 16 and str(q.dtype) == "mxfp6_e2m3[16]"
    assert q.nbytes == 36 + 3
    _assert_matches_reference(x, "mxfp6_e2m3", block_size=16, q=q)
    with pytest.raises(ValueError):
        mx.quantize(x, "mx6", block_size=0)
    with pytest.raises(ValueError):
        mx.quantize(x, "mx6", axis=1)
    with pytest.raises(ValueError):
        mx.quantize(np.float32(1.0), "mx6")


def test_mxarray_is_a_pytree_that_crosses_jit():
    q = mx.quantize(np.ones((2, 40), np.float32), "mx4")
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2 and leaves[0] is q.elements and leaves[1] is q.scales
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(q2, mx.MXArray) and q2.dtype == q.dtype and q2.axis == 1
    with pytest.raises(ValueError):
        mx.MXArray(q.elements, q.scales[:, :1], "mx4", axis=1)
    # MXArray crosses a jit boundary as an argument and as a result
    d = jax.jit(mx.dequantize)(q)
    np.testing.assert_array_equal(np.asarray(d), 1.0)
    assert q.dequantize(jnp.float16).dtype == jnp.float16
    q3 = jax.jit(lambda x: mx.quantize(x, "mx4"))(np.ones((2, 40), np.float32))
    assert isinstance(q3, mx.MXArray) and q3.scales.shape == (2, 2)
    # shape-only evaluation (no numerics)
    s = jax.eval_shape(lambda x: mx.quantize(x, "mx6", axis=0),
                       jax.ShapeDtypeStruct((70, 8), jnp.bfloat16))
    assert s.shape == (70, 8) and s.axis == 0 and s.nbytes == 70 * 8 * 6 // 8 + 3 * 8
    assert s.elements.dtype == np.uint8 and s.scales.shape == (3, 8)
    # empty blocked axis
    qe = mx.quantize(np.zeros((3, 0), np.float32), "mx4")
    assert qe.scales.shape == (3, 0) and qe.nbytes == 0
    assert mx.dequantize(qe).shape == (3, 0)


def test_fp6_storage_views_as_ml_dtypes():
    x = np.array([1.0, -0.5, 7.5, 0.125] + [0.0] * 28, np.float32)
    q = mx.quantize(x, "mxfp6_e2m3")
    assert q.elements.dtype == np.uint8
    vals = np.asarray(q.elements).view(ml_dtypes.float6_e2m3fn).astype(np.float32)
    np.testing.assert_array_equal(vals[:4] * 2.0 ** (int(_bits(q)[1][0]) - 127), x[:4])
    q4 = mx.quantize(x, "mxfp4_e2m1")
    assert np.asarray(q4.elements).dtype == np.dtype(ml_dtypes.float4_e2m1fn)


# --------------------------------------------------------------------------
# transformations
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ALL)
def test_jit_and_vmap_match_eager(fmt):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 3, 70)) * np.exp2(rng.integers(-30, 30, (5, 3, 70)))
         ).astype(np.float32)
    x[0, 0, 3] = np.nan
    x[1, 1, 40] = -np.inf
    eager = mx.quantize(x, fmt, axis=-1)
    jitted = jax.jit(lambda v: mx.quantize(v, fmt, axis=-1))(x)
    vmapped = jax.vmap(lambda v: mx.quantize(v, fmt, axis=-1))(x)
    vv = jax.vmap(jax.vmap(lambda v: mx.quantize(v, fmt, axis=0)))(x)
    for other in (jitted, vmapped, vv):
        assert other.shape == eager.shape and other.axis == eager.axis
        np.testing.assert_array_equal(_bits(other)[0], _bits(eager)[0])
        np.testing.assert_array_equal(_bits(other)[1], _bits(eager)[1])
    d = np.asarray(mx.dequantize(eager))
    _assert_same_f32(jax.jit(mx.dequantize)(eager), d)
    _assert_same_f32(jax.vmap(mx.dequantize)(eager), d)
    _assert_same_f32(jax.jit(lambda v: mx.fake_quantize(v, fmt))(x), d)
    _assert_same_f32(jax.vmap(lambda v: mx.fake_quantize(v, fmt))(x), d)
    # vmap over a non-leading axis of the input
    vm1 = jax.vmap(lambda v: mx.quantize(v, fmt, axis=-1), in_axes=1, out_axes=0)(x)
    np.testing.assert_array_equal(_bits(vm1)[0], np.swapaxes(_bits(eager)[0], 0, 1))


def test_fake_quantize_gradient_is_identity():
    x = jnp.linspace(-10, 10, 70, dtype=jnp.float32).reshape(2, 35)
    for fmt in ALL:
        g = jax.grad(lambda v: mx.fake_quantize(v, fmt, axis=0).sum())(x)
        np.testing.assert_array_equal(np.asarray(g), 1.0)
        w = jnp.arange(70.0).reshape(2, 35)
        g2 = jax.grad(lambda v: (mx.fake_quantize(v, fmt) * w).sum())(x)
        np.testing.assert_array_equal(np.asarray(g2), np.asarray(w))
        _, t = jax.jvp(lambda v: mx.fake_quantize(v, fmt), (x,), (jnp.ones_like(x),))
        np.testing.assert_array_equal(np.asarray(t), 1.0)
    gb = jax.grad(lambda v: mx.fake_quantize(v, "mx4").astype(jnp.float32).sum())(
        x.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gb, np.float32), 1.0)


# --------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------

_finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False,
                        allow_subnormal=True)


def _f32_arrays(n=64):
    return hnp.arrays(np.float32, (n,), elements=_finite_f32)


_jit_q = {f: jax.jit(lambda v, f=f: mx.quantize(v, f)) for f in ALL}
_jit_fq = {f: jax.jit(lambda v, f=f: mx.fake_quantize(v, f)) for f in ALL}

_hyp = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", ALL)
@_hyp
@given(x=_f32_arrays(), scale_pow=st.integers(-140, 100))
def test_error_within_half_ulp(fmt, x, scale_pow):
    with np.errstate(over="ignore"):
        x = (x.astype(np.float64) * 2.0**scale_pow).astype(np.float32)  # vary magnitude
    x = np.where(np.isfinite(x), x, np.float32(0))
    f = mx.get_format(fmt)
    q = _jit_q[fmt](x)
    X = np.exp2(np.repeat(_bits(q)[1].astype(np.float64) - 127, 32))
    deq = np.asarray(mx.dequantize(q), np.float64)
    xs = x.astype(np.float64) / X
    mag = np.abs(xs)
    if f.is_int:
        ulp = np.full_like(mag, 2.0**-6)
    else:
        e = np.frexp(mag)[1] - 1.0  # floor(log2(mag)); zeros get the subnormal step
        ulp = np.exp2(np.maximum(e, f.emin) - f.mantissa_bits)
    ok = mag <= f.max_normal  # not saturated
    err = np.abs(deq - x.astype(np.float64))
    assert np.all(err[ok] <= 0.5 * ulp[ok] * X[ok])
    assert np.all(np.abs(deq[~ok]) == f.max_normal * X[~ok])
    # the block maximum is never flushed by the FLOOR scale rule
    for b in range(2):
        blk = np.abs(x[32 * b : 32 * (b + 1)])
        if blk.max() >= 2.0**-126:
            floor_pow2 = 2.0 ** (np.frexp(np.float64(blk.max()))[1] - 1)
            assert np.abs(deq[32 * b : 32 * (b + 1)]).max() >= floor_pow2


@pytest.mark.parametrize("fmt", ALL)
@_hyp
@given(x=_f32_arrays())
def test_fake_quantize_idempotent(fmt, x):
    y = _jit_fq[fmt](x)
    z = _jit_fq[fmt](y)
    _assert_same_f32(y, z)


@_hyp
@given(x=_f32_arrays(40), fmt=st.sampled_from(ALL))
def test_gradient_of_sum_is_ones(x, fmt):
    g = jax.grad(lambda v: mx.fake_quantize(v, fmt).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), 1.0)


@_hyp
@given(x=hnp.arrays(np.float32, (2, 48), elements=st.floats(width=32)),
       fmt=st.sampled_from(ALL), axis=st.sampled_from([0, 1]),
       block_size=st.sampled_from([8, 32]))
def test_matches_reference_property(x, fmt, axis, block_size):
    _assert_matches_reference(x, fmt, axis=axis, block_size=block_size)


# --------------------------------------------------------------------------
# acceptance: >= 10^6 adversarial values, bit for bit against the reference
# --------------------------------------------------------------------------

def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def _adversarial_blocks(seed=0):
    """(N, 32) float32 blocks covering every exponent and the rounding corners."""
    rng = np.random.default_rng(seed)
    B = 32
    parts = []

    def sign(shape):
        return rng.integers(0, 2, shape).astype(np.uint32) << np.uint32(31)

    # 1. raw random bit patterns (all exponents, subnormals, NaN, Inf)
    parts.append(_f32(rng.integers(0, 2**32, (4096, B), dtype=np.uint64)))

    # 2. blocks of similar magnitude: exponent field in [base - spread, base]
    n = 12288
    base = rng.integers(0, 255, (n, 1))
    spread = rng.integers(0, 14, (n, B))
    efield = np.clip(base - spread, 0, 254).astype(np.uint32)
    mant = rng.integers(0, 2**23, (n, B)).astype(np.uint32)
    # low mantissa bits cleared in half of the blocks: exact element values
    # and exact ties are then frequent for every format
    keep = rng.integers(0, 2, (n, 1)).astype(bool)
    trunc = np.uint32(~((1 << rng.integers(18, 23)) - 1) & 0x7FFFFF)
    mant = np.where(keep, mant, mant & trunc)
    parts.append(_f32(sign((n, B)) | (efield << np.uint32(23)) | mant))

    # 3. exact rounding midpoints of every format, just above and below them,
    #    at random block scales (block amax = 2^emax * X fixes the scale)
    for name in ALL:
        if name == "mxint8":
            grid = np.arange(128, dtype=np.float64) / 64
        else:
            grid = ref.table(name).values
        mids = (grid[:-1] + grid[1:]) / 2
        mids = np.concatenate([mids, [grid[-1] + (grid[-1] - grid[-2]) / 2]])
        n = 2048
        s = rng.integers(-127, 128 - ref.emax(name), (n, 1))
        s[: n // 8] = rng.integers(-127, -110, (n // 8, 1))      # fp32-subnormal zone
        s[n // 8 : n // 4] = rng.integers(100, 128 - ref.emax(name), (n // 8, 1))
        pick = mids[rng.integers(0, len(mids), (n, B))]
        nudge = rng.integers(-1, 2, (n, B))                     # -1 ulp, exact, +1 ulp
        vals = np.ldexp(pick, s).astype(np.float32)
        vals = np.where(nudge < 0, np.nextafter(vals, np.float32(0)),
                        np.where(nudge > 0, np.nextafter(vals, np.float32(np.inf)), vals))
        vals[:, 0] = np.ldexp(1.0, s[:, 0] + ref.emax(name))
        vals = vals * np.where(rng.integers(0, 2, (n, B)) == 1, -1, 1).astype(np.float32)
        perm = rng.permuted(np.tile(np.arange(B), (n, 1)), axis=1)
        parts.append(np.take_along_axis(vals, perm, axis=1))

    # 4. around max normal and around the block amax binade boundaries
    for name in ALL:
        if name == "mxint8":
            top = 127 / 64
        else:
            top = ref.table(name).max
        n = 1024
        s = rng.integers(-127, 128 - ref.emax(name), (n, 1))
        k = rng.integers(-4, 5, (n, B))
        vals = np.ldexp(np.float64(top), s).astype(np.float32)
        vals = np.broadcast_to(vals, (n, B)).copy()
        up, down = vals.copy(), vals.copy()
        for _ in range(4):
            up = np.nextafter(up, np.float32(np.inf))
            down = np.nextafter(down, np.float32(0))
        vals = np.where(k > 0, up, np.where(k < 0, down, vals))
        e = s + ref.emax(name)
        p2 = np.ldexp(1.0, e).astype(np.float32)
        with np.errstate(over="ignore"):
            twice = 2 * p2
        boundary = np.concatenate([
            p2, np.nextafter(p2, np.float32(0)), np.nextafter(twice, np.float32(0)),
            np.nextafter(p2, np.float32(np.inf))], axis=1)
        vals[:, :4] = boundary
        vals[:, 4:8] *= np.float32(0.5)
        parts.append(vals * np.where(rng.integers(0, 2, (n, B)) == 1, -1, 1).astype(np.float32))

    # 5. specials: zeros, -0.0, NaN, +-Inf, fp32 subnormals, largest finite
    n = 2048
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 2.0**-149, -(2.0**-149),
                         2.0**-126, np.nextafter(np.float32(2.0**-126), np.float32(0)),
                         np.finfo(np.float32).max, -np.finfo(np.float32).max, 1.0],
                        np.float32)
    sp = specials[rng.integers(0, len(specials), (n, B))]
    mask = rng.random((n, 1)) < 0.5
    filler = _f32(sign((n, B)) | (rng.integers(0, 255, (n, B)).astype(np.uint32) << np.uint32(23)))
    sp = np.where(mask & (rng.random((n, B)) < 0.9), filler, sp)
    sp[:64] = 0.0
    sp[64:128] = -0.0
    sp[128:192] = _f32(rng.integers(0, 2**23, (64, B)).astype(np.uint32) | sign((64, B)))
    parts.append(sp)

    return np.concatenate(parts, axis=0).astype(np.float32)


def test_acceptance_adversarial_bit_exact():
    x = _adversarial_blocks()
    assert x.size >= 10**6
    assert np.isnan(x).any() and np.isinf(x).any() and (x.view(np.uint32) == 0x80000000).any()
    assert ((np.abs(x) < 2.0**-126) & (x != 0)).any()
    for fmt in ALL:
        q = jax.jit(lambda v: mx.quantize(v, fmt))(x)
        eb, sb = _bits(q)
        reb, rsb = ref.quantize_ref(x, fmt)
        np.testing.assert_array_equal(sb, rsb, err_msg=fmt)
        care = np.repeat(rsb != 255, 32, axis=1)
        bad = (eb != reb) & care
        assert not bad.any(), (
            fmt, x[bad][:8], eb[bad][:8], reb[bad][:8])
        assert (rsb == 255).any() and (rsb == 0).any()
        d = jax.jit(mx.dequantize)(q)
        _assert_same_f32(d, ref.dequantize_ref(reb, rsb, fmt))
