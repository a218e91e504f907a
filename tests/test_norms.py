"""rms_norm, layer_norm and swiglu (mtia_jax.primitives.norms / .swiglu).

Numerics against float64 NumPy versions of the textbook formulas and against
``flax.nnx.RMSNorm`` / ``LayerNorm``; every transformation (jit, vmap, grad,
mtia_jax.jit) against the reference; argument errors; the work rules of
runtime.accelerated.norms against hand counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

import mtia_jax
from mtia_jax import chips
from mtia_jax.primitives.norms import layer_norm, rms_norm
from mtia_jax.primitives.swiglu import swiglu

F32_TOL = dict(rtol=2e-5, atol=2e-5)
BF16_TOL = dict(rtol=2 ** -7, atol=2 ** -7)  # one bf16 rounding of an fp32 result


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)


# ------------------------------------------------------------ NumPy references

def np_rms_norm(x, w, eps):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_layer_norm(x, w, b, eps):
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def np_swiglu(x, wg, wu):
    x, wg, wu = (np.asarray(a, np.float64) for a in (x, wg, wu))
    g = x @ wg
    return g / (1.0 + np.exp(-g)) * (x @ wu)


# ------------------------------------------------------------ numerics

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_matches_textbook_formula(dtype):
    x, w = _normal(0, (3, 5, 16), dtype, 3.0), _normal(1, (16,), dtype)
    got = rms_norm(x, w)
    assert got.dtype == dtype and got.shape == x.shape
    want = np_rms_norm(x, w, 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               **(F32_TOL if dtype == jnp.float32 else BF16_TOL))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_textbook_formula(dtype):
    x = _normal(2, (4, 16), dtype, 2.0) + 5.0  # an offset mean
    w, b = _normal(3, (16,), dtype), _normal(4, (16,), dtype)
    got = layer_norm(x, w, b, eps=1e-3)
    assert got.dtype == dtype and got.shape == x.shape
    want = np_layer_norm(x, w, b, 1e-3)
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               **(F32_TOL if dtype == jnp.float32 else BF16_TOL))


def test_bf16_inputs_are_normalized_in_fp32_and_rounded_once():
    # a row whose sum of squares overflows bf16's precision badly if
    # accumulated in bf16: 256 equal elements plus one large one
    x = jnp.concatenate([jnp.full((1, 256), 1.0), jnp.full((1, 1), 300.0)], axis=1)
    w = jnp.ones((257,))
    want = rms_norm(x, w).astype(jnp.bfloat16)  # fp32 result, rounded once
    got = rms_norm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_matches_flax_nnx_norms():
    x = _normal(5, (2, 3, 12), scale=2.0)
    w, b = _normal(6, (12,)), _normal(7, (12,))
    flax_rms = nnx.RMSNorm(12, epsilon=1e-6, rngs=nnx.Rngs(0))
    flax_rms.scale.set_value(w)
    np.testing.assert_allclose(rms_norm(x, w, eps=1e-6), flax_rms(x), **F32_TOL)
    flax_ln = nnx.LayerNorm(12, epsilon=1e-5, rngs=nnx.Rngs(0))
    flax_ln.scale.set_value(w)
    flax_ln.bias.set_value(b)
    np.testing.assert_allclose(layer_norm(x, w, b), flax_ln(x), **F32_TOL)


@pytest.mark.parametrize("dtypes", [(jnp.float32,) * 3, (jnp.bfloat16,) * 3,
                                    (jnp.bfloat16, jnp.float32, jnp.float32)])
def test_swiglu_matches_silu_gate_formula(dtypes):
    x = _normal(8, (2, 3, 8), dtypes[0])
    wg, wu = _normal(9, (8, 6), dtypes[1]), _normal(10, (8, 6), dtypes[2])
    got = swiglu(x, wg, wu)
    assert got.shape == (2, 3, 6) and got.dtype == jnp.result_type(*dtypes)
    tol = F32_TOL if got.dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(np.asarray(got, np.float64), np_swiglu(x, wg, wu), **tol)
    if dtypes == (jnp.float32,) * 3:
        np.testing.assert_allclose(got, jax.nn.silu(x @ wg) * (x @ wu), **F32_TOL)


@settings(max_examples=8, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), d=st.integers(1, 12),
       eps=st.sampled_from([0.0, 1e-6, 1e-2]), seed=st.integers(0, 2 ** 16))
def test_norms_random_shapes(lead, d, eps, seed):
    shape = (*lead, d)
    x = _normal(seed, shape, scale=2.0) + 0.5
    w, b = _normal(seed + 1, (d,)), _normal(seed + 2, (d,))
    np.testing.assert_allclose(rms_norm(x, w, eps=eps), np_rms_norm(x, w, eps), rtol=1e-4, atol=1e-4)
    if d > 1 or eps > 0:  # a single element has zero variance
        np.testing.assert_allclose(layer_norm(x, w, b, eps=eps), np_layer_norm(x, w, b, eps),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ transformations

def _all_three(x, w, b, wg, wu):
    h = rms_norm(x, w) + layer_norm(x, w, b)
    return swiglu(h, wg, wu)


def _args():
    return (_normal(11, (2, 4, 8)), _normal(12, (8,)), _normal(13, (8,)),
            _normal(14, (8, 5)), _normal(15, (8, 5)))


def test_jit_and_mtia_jit_match_the_reference():
    args = _args()
    eager = _all_three(*args)
    jitted = jax.jit(_all_three)(*args)
    np.testing.assert_allclose(jitted, eager, **F32_TOL)
    ours = mtia_jax.jit(_all_three)(*args)
    np.testing.assert_array_equal(ours, jitted)  # graph mode binds the same lowering
    text = mtia_jax.jit(_all_three).lower(*args).as_text()
    assert "rms_norm(" in text and "layer_norm(" in text and "swiglu(" in text


def test_grads_of_every_primitive():
    x, w, b, wg, wu = _args()
    check_grads(jax.jit(rms_norm), (x, w), order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(layer_norm), (x, w, b), order=1, modes=("fwd", "rev"))
    check_grads(jax.jit(swiglu), (x, wg, wu), order=1, modes=("fwd", "rev"))


def test_grad_runs_under_mtia_jit():
    args = _args()
    loss = lambda *a: jnp.sum(_all_three(*a) ** 2)
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    got = mtia_jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def _primitive_names(fn, *args):
    return [eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns]


def test_vmap_over_x_keeps_the_primitive():
    x, w, b, wg, wu = _args()  # x (2, 4, 8): map axis 1
    for name, fn, extra in (("rms_norm", rms_norm, (w,)), ("layer_norm", layer_norm, (w, b)),
                            ("swiglu", swiglu, (wg, wu))):
        mapped = jax.vmap(fn, in_axes=(1, *[None] * len(extra)))
        got = mapped(x, *extra)
        want = jnp.stack([fn(x[:, i], *extra) for i in range(x.shape[1])])
        np.testing.assert_allclose(got, want, **F32_TOL)
        names = _primitive_names(mapped, x, *extra)
        assert names.count(name) == 1, names
        assert "dot_general" not in names and "reduce_sum" not in names


def test_vmap_over_weights_maps_the_reference():
    x = _normal(16, (3, 8))
    ws, bs = _normal(17, (4, 8)), _normal(18, (4, 8))
    wgs, wus = _normal(19, (4, 8, 5)), _normal(20, (4, 8, 5))
    got = jax.jit(jax.vmap(rms_norm, in_axes=(None, 0)))(x, ws)
    np.testing.assert_allclose(got, np.stack([np_rms_norm(x, w, 1e-6) for w in ws]), **F32_TOL)
    got = jax.jit(jax.vmap(layer_norm, in_axes=(0, 0, 0)))(jnp.stack([x] * 4), ws, bs)
    np.testing.assert_allclose(got, np.stack([np_layer_norm(x, w, b, 1e-5)
                                              for w, b in zip(ws, bs)]), **F32_TOL)
    got = jax.jit(jax.vmap(swiglu, in_axes=(None, 0, 0)))(x, wgs, wus)
    np.testing.assert_allclose(got, np.stack([np_swiglu(x, a, c) for a, c in zip(wgs, wus)]),
                               **F32_TOL)


# ------------------------------------------------------------ errors

@pytest.mark.parametrize("call, message", [
    (lambda: rms_norm(jnp.ones((2, 8)), jnp.ones((7,))), r"weight must have shape \(D,\) = \(8,\)"),
    (lambda: rms_norm(jnp.ones(()), jnp.ones((1,))), "x must have at least one axis"),
    (lambda: rms_norm(jnp.ones((2, 8)), jnp.ones((8,)), eps=-1.0), "eps must be finite and >= 0"),
    (lambda: layer_norm(jnp.ones((2, 8)), jnp.ones((8,)), jnp.ones((2, 8))),
     r"bias must have shape \(D,\) = \(8,\) .* got shape \(2, 8\)"),
    (lambda: swiglu(jnp.ones((2, 8)), jnp.ones((4, 5)), jnp.ones((4, 5))),
     r"w_gate must have shape \(D, F\) with D = 8 .* got shape \(4, 5\)"),
    (lambda: swiglu(jnp.ones((2, 8)), jnp.ones((8, 5)), jnp.ones((8, 6))),
     r"w_up must have the shape of w_gate \(D, F\) = \(8, 5\), got shape \(8, 6\)"),
])
def test_shape_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: rms_norm(jnp.ones((2, 8), jnp.int32), jnp.ones((8,))), "x must be a floating-point"),
    (lambda: layer_norm(jnp.ones((2, 8)), jnp.ones((8,)), [0.0] * 8), "bias must be a floating"),
    (lambda: swiglu(jnp.ones((2, 8)), jnp.ones((8, 5), jnp.int8), jnp.ones((8, 5))),
     "w_gate must be a floating-point array, got dtype int8"),
    (lambda: rms_norm(jnp.ones((2, 8)), jnp.ones((8,)), eps="small"), "eps must be a Python float"),
])
def test_type_errors_name_the_argument(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# ------------------------------------------------------------ cost rules

def _kernels(fn, *structs, chip="mtia450"):
    return mtia_jax.jit(fn, chip=chip).lower(*structs).compile().cost.kernels


def test_norm_cost_is_one_vector_kernel_over_inputs_and_outputs():
    chip = chips.get("mtia450")
    x = jax.ShapeDtypeStruct((4, 16, 64), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((64,), jnp.bfloat16)
    n, rows = 4 * 16 * 64, 4 * 16
    for fn, args, per_element, per_row, params in (
            (rms_norm, (x, w), 4, 2, 1), (layer_norm, (x, w, w), 7, 3, 2)):
        (k,) = _kernels(fn, *args)
        assert (k.flops, k.transcendentals) == (per_element * n + per_row * rows, rows)
        assert k.hbm_bytes == 2 * n * 2 + params * 64 * 2  # x in, y out, weight (and bias)
        vector = chip.vector_peak(jnp.float32)  # the kernels compute in fp32
        assert k.compute_s == pytest.approx((k.flops + k.transcendentals) / vector)
        assert k.ideal_matrix_s == 0


def test_norm_kernel_moves_less_than_the_unfused_formula():
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((256,), jnp.float32)
    fused = sum(k.hbm_bytes for k in _kernels(lambda x, w: layer_norm(x, w, w), x, w))
    unfused = lambda x, w: ((x - x.mean(-1, keepdims=True))
                            * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * w + w)
    assert fused == (2 * 64 * 256 + 2 * 256) * 4
    assert sum(k.hbm_bytes for k in _kernels(unfused, x, w)) > fused


def test_swiglu_cost_counts_match_the_unfused_composite():
    chip = chips.get("mtia450")
    m, d, f = 32, 64, 96
    structs = (jax.ShapeDtypeStruct((2, 16, d), jnp.bfloat16),
               jax.ShapeDtypeStruct((d, f), jnp.bfloat16), jax.ShapeDtypeStruct((d, f), jnp.bfloat16))
    (k,) = _kernels(swiglu, *structs)
    assert k.flops == 2 * 2 * m * d * f + 2 * m * f
    assert k.transcendentals == m * f
    # inputs and output only: the (M, F) gate and up activations stay on chip
    assert k.hbm_bytes == (m * d + 2 * d * f + m * f) * 2
    assert k.ideal_matrix_s == pytest.approx(k.flops / chip.matmul_peak(jnp.bfloat16))
    assert k.ideal_vector_s == pytest.approx(m * f / chip.vector_peak(jnp.bfloat16))
    composite = _kernels(lambda x, a, b: jax.nn.silu(x @ a) * (x @ b), *structs)
    assert sum(c.flops for c in composite) == k.flops
    assert sum(c.transcendentals for c in composite) == k.transcendentals
    assert sum(c.hbm_bytes for c in composite) > k.hbm_bytes
