"""moe_ffn (mtia_jax.primitives.moe_ffn) and its work rule (runtime.accelerated.moe).

The block-sparse primitive is checked against two independent references: a
dense jnp version (every expert on every token, then select) and a float64
NumPy loop over tokens with its own top-k and softmax.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

import mtia_jax
from mtia_jax import chips
from mtia_jax.primitives.moe_ffn import _block_rows, moe_ffn
from runtime import op_work  # noqa: F401  (before the rule module: op_work imports the rule tables)
from runtime.accelerated.moe import expected_experts_hit

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def make(seed, t, d, f, e, dtype=jnp.float32, logits=None):
    rng = np.random.default_rng(seed)
    def arr(*shape, scale):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)

    x = arr(t, d, scale=1.0)
    if logits is None:
        # distinct logits, well apart, so that top-k has no near-ties
        logits = np.stack([rng.permutation(e) for _ in range(t)]).astype(np.float32) * 0.7
        logits += rng.standard_normal((t, e)).astype(np.float32) * 0.05
    return (x, jnp.asarray(logits, jnp.float32), arr(e, d, f, scale=d ** -0.5),
            arr(e, d, f, scale=d ** -0.5), arr(e, f, d, scale=f ** -0.5))


# ------------------------------------------------------------ references

@functools.partial(jax.jit, static_argnums=5)
def dense_moe(x, logits, w_gate, w_up, w_down, top_k):
    """Every expert on every token, then a (T, E) combine matrix selects."""
    hp = jax.lax.Precision.HIGHEST
    top_vals, experts = jax.lax.top_k(logits, top_k)
    probs = jax.nn.softmax(top_vals.astype(jnp.float32), axis=-1)
    combine = jnp.sum(jax.nn.one_hot(experts, logits.shape[1]) * probs[..., None], axis=1)
    f32 = lambda a: a.astype(jnp.float32)
    gate = jnp.einsum("td,edf->etf", f32(x), f32(w_gate), precision=hp)
    up = jnp.einsum("td,edf->etf", f32(x), f32(w_up), precision=hp)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype).astype(jnp.float32)
    out = jnp.einsum("etf,efd->etd", hidden, f32(w_down), precision=hp)
    return jnp.einsum("te,etd->td", combine, out, precision=hp).astype(x.dtype)


def numpy_moe(x, logits, w_gate, w_up, w_down, top_k):
    """Token by token in float64: own top-k (stable: lower index wins ties) and softmax."""
    x, logits, w_gate, w_up, w_down = (np.asarray(a, np.float64)
                                       for a in (x, logits, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-logits[t], kind="stable")[:top_k]
        p = np.exp(logits[t, chosen] - logits[t, chosen].max())
        p /= p.sum()
        for weight, e in zip(p, chosen):
            g, u = x[t] @ w_gate[e], x[t] @ w_up[e]
            out[t] += weight * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
    return out


# ------------------------------------------------------------ numerics

SHAPES = [  # (T, D, F, E, k)
    (6, 4, 5, 4, 2),
    (1, 3, 2, 3, 3),     # one token, k = E
    (17, 8, 6, 5, 1),    # top-1
    (300, 4, 3, 2, 2),   # groups of 300 rows: several 128-row blocks per expert
]


@pytest.mark.parametrize("t, d, f, e, k", SHAPES)
def test_matches_dense_and_numpy_references(t, d, f, e, k):
    args = make(t, t, d, f, e)
    got = moe_ffn(*args, top_k=k)
    assert got.shape == (t, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, dense_moe(*args, k), **F32_TOL)
    np.testing.assert_allclose(got, numpy_moe(*args, k), rtol=1e-4, atol=1e-4)


def test_skewed_routing_all_tokens_to_one_expert():
    t, d, f, e = 40, 4, 3, 6
    logits = np.zeros((t, e), np.float32)
    logits[:, 4] = 5.0          # every token's first choice
    logits[:, 1] = 2.0          # and second
    args = make(1, t, d, f, e, logits=logits)
    np.testing.assert_allclose(moe_ffn(*args, top_k=2), numpy_moe(*args, 2), rtol=1e-4, atol=1e-4)


def test_ties_pick_the_lower_expert_index():
    args = make(2, 5, 4, 3, 4, logits=np.zeros((5, 4), np.float32))  # all logits equal
    np.testing.assert_allclose(moe_ffn(*args, top_k=2), numpy_moe(*args, 2), rtol=1e-4, atol=1e-4)


def test_bf16_agrees_with_dense_reference():
    args = make(3, 12, 8, 16, 4, dtype=jnp.bfloat16)
    got = moe_ffn(*args, top_k=2)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(dense_moe(*args, 2), np.float32), rtol=2e-2, atol=2e-2)


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 24), d=st.integers(1, 6), f=st.integers(1, 6), e=st.integers(1, 6),
       data=st.data())
def test_random_shapes_against_numpy(t, d, f, e, data):
    k = data.draw(st.integers(1, e))
    args = make(data.draw(st.integers(0, 2 ** 16)), t, d, f, e)
    np.testing.assert_allclose(moe_ffn(*args, top_k=k), numpy_moe(*args, k), rtol=1e-4, atol=1e-4)


def test_block_rows_follow_the_mean_group_size():
    assert _block_rows(12, 4) == 4       # mean 3 -> 4
    assert _block_rows(16, 4) == 4
    assert _block_rows(1, 8) == 1
    assert _block_rows(10_000, 2) == 128  # capped


# ------------------------------------------------------------ transformations

def test_jit_and_mtia_jit_match():
    args = make(4, 10, 8, 6, 4)
    fn = lambda *a: moe_ffn(*a, top_k=2)
    want = jax.jit(fn)(*args)
    np.testing.assert_allclose(want, dense_moe(*args, 2), **F32_TOL)
    np.testing.assert_array_equal(mtia_jax.jit(fn)(*args), want)
    text = mtia_jax.jit(fn).lower(*args).as_text()
    assert "moe_ffn(" in text and "top_k=2" in text and "dot_general" not in text


def test_gradients_match_finite_differences_and_unchosen_experts_get_none():
    args = make(5, 6, 3, 4, 3)
    check_grads(jax.jit(lambda *a: moe_ffn(*a, top_k=2)), args, order=1, modes=("rev",))
    # the router gets gradient only through the softmax of the chosen logits
    g = jax.jit(jax.grad(lambda lg: jnp.sum(moe_ffn(args[0], lg, *args[2:], top_k=2))))(args[1])
    unchosen = np.argsort(-np.asarray(args[1]), axis=1)[:, 2:]
    assert np.all(np.take_along_axis(np.asarray(g), unchosen, axis=1) == 0)


def test_grad_under_mtia_jit():
    args = make(6, 6, 4, 3, 3)
    loss = lambda *a: jnp.sum(moe_ffn(*a, top_k=2) ** 2)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    for got, want in zip(mtia_jax.jit(grad)(*args), jax.jit(grad)(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_folds_batches_into_tokens():
    batch = [make(7 + i, 5, 4, 3, 4) for i in range(3)]
    xs, lgs = jnp.stack([b[0] for b in batch]), jnp.stack([b[1] for b in batch])
    weights = batch[0][2:]
    fn = lambda x, lg: moe_ffn(x, lg, *weights, top_k=2)
    want = np.stack([numpy_moe(x, lg, *weights, 2) for x, lg in zip(xs, lgs)])
    np.testing.assert_allclose(jax.vmap(fn)(xs, lgs), want, rtol=1e-4, atol=1e-4)
    # batch axis 1 of x, one logits matrix for every batch entry
    got = jax.vmap(fn, in_axes=(1, None))(jnp.moveaxis(xs, 0, 1), lgs[0])
    want = np.stack([numpy_moe(x, lgs[0], *weights, 2) for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    eqns = jax.make_jaxpr(jax.vmap(fn))(xs, lgs).eqns
    moe = [q for q in eqns if q.primitive.name == "moe_ffn"]
    assert len(moe) == 1 and moe[0].invars[0].aval.shape == (15, 4)  # 3 x 5 tokens of D = 4
    assert not any(q.primitive.name == "dot_general" for q in eqns)


def test_vmap_over_weights_maps_the_reference():
    x, lg, *_ = make(10, 5, 4, 3, 4)
    stacks = [make(11 + i, 5, 4, 3, 4)[2:] for i in range(2)]
    wg, wu, wd = (jnp.stack(ws) for ws in zip(*stacks))
    got = jax.jit(jax.vmap(lambda a, b, c: moe_ffn(x, lg, a, b, c, top_k=2)))(wg, wu, wd)
    want = np.stack([numpy_moe(x, lg, *ws, 2) for ws in stacks])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ errors

def _bad(**changes):
    x, lg, wg, wu, wd = make(0, 4, 6, 5, 3)
    args = dict(x=x, router_logits=lg, w_gate=wg, w_up=wu, w_down=wd, top_k=2)
    args.update(changes)
    return lambda: moe_ffn(args.pop("x"), args.pop("router_logits"), args.pop("w_gate"),
                           args.pop("w_up"), args.pop("w_down"), **args)


@pytest.mark.parametrize("call, message", [
    (_bad(x=jnp.ones((2, 4, 6))), r"x must have shape \(T, D\)"),
    (_bad(router_logits=jnp.ones((5, 3))), r"router_logits must have shape \(T, E\) with T = 4"),
    (_bad(w_gate=jnp.ones((3, 7, 5))), r"w_gate must have shape \(E, D, F\) with E = 3 .* D = 6"),
    (_bad(w_gate=jnp.ones((4, 6, 5))), r"w_gate must have shape \(E, D, F\) with E = 3"),
    (_bad(w_up=jnp.ones((3, 6, 4))), r"w_up must have shape \(E, D, F\) like w_gate = \(3, 6, 5\)"),
    (_bad(w_down=jnp.ones((3, 6, 5))), r"w_down must have shape \(E, F, D\) = \(3, 5, 6\)"),
    (_bad(top_k=4), r"top_k must be in \[1, E\] = \[1, 3\] .* got top_k=4"),
    (_bad(top_k=0), r"top_k must be in \[1, E\]"),
])
def test_bad_shapes_and_top_k_raise_value_errors_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (_bad(top_k=2.0), "top_k must be a Python int"),
    (_bad(x=jnp.ones((4, 6), jnp.int32)), "x must be a floating-point array, got dtype int32"),
])
def test_non_int_top_k_and_integer_inputs_raise_type_errors(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# ------------------------------------------------------------ cost rule

def test_expected_experts_hit_matches_simulated_uniform_routing():
    rng = np.random.default_rng(0)
    for t, e, k in ((1, 8, 2), (4, 8, 2), (16, 64, 6), (3, 5, 5)):
        hits = [len({int(v) for _ in range(t) for v in rng.choice(e, k, replace=False)})
                for _ in range(4000)]
        assert expected_experts_hit(t, e, k) == pytest.approx(np.mean(hits), rel=0.02)
    assert expected_experts_hit(1, 8, 2) == 2  # one token hits exactly its k experts
    assert expected_experts_hit(10_000, 8, 2) == pytest.approx(8)


def _moe_kernel(chip, t, d, f, e, k, dtype=jnp.bfloat16):
    structs = [jax.ShapeDtypeStruct(s, dtype) for s in
               ((t, d), (t, e), (e, d, f), (e, d, f), (e, f, d))]
    compiled = mtia_jax.jit(lambda *a: moe_ffn(*a, top_k=k), chip=chip).lower(*structs).compile()
    (kernel,) = compiled.cost.kernels
    return kernel


def test_cost_on_a_chip_with_the_moe_unit():
    chip = chips.get("mtia450")
    assert "moe_ffn" in chip.units
    t, d, f, e, k = 4, 256, 512, 8, 2
    kernel = _moe_kernel(chip, t, d, f, e, k)
    assert kernel.flops == 6 * t * k * d * f + 2 * t * k * f + 2 * t * k * d
    assert kernel.transcendentals == t * k * f + t * k
    hit = e * (1 - (1 - k / e) ** t)
    assert hit == pytest.approx(5.46875)  # 8 (1 - 0.75^4)
    weights = hit * 3 * d * f * 2
    assert kernel.hbm_bytes == pytest.approx((t * d + t * e + t * d) * 2 + weights)
    # the unit absorbs the special functions: compute is the matrix engine's
    assert kernel.compute_s == pytest.approx(kernel.flops / chip.matmul_peak(jnp.bfloat16))
    assert kernel.hbm_s == pytest.approx(kernel.hbm_bytes / chip.hbm_bandwidth)


def test_cost_without_the_unit_adds_dispatch_and_combine():
    chip = chips.get("mtia400")
    assert "moe_ffn" not in chip.units
    t, d, f, e, k = 64, 128, 256, 4, 2
    kernel = _moe_kernel(chip, t, d, f, e, k)
    io = (t * d + t * e + t * d) * 2
    weights = e * (1 - (1 - k / e) ** t) * 3 * d * f * 2
    assert kernel.hbm_bytes == pytest.approx(io + weights + 4 * t * k * d * 2)
    special = kernel.transcendentals / chip.vector_peak(jnp.bfloat16)
    assert kernel.compute_s == pytest.approx(max(kernel.flops / chip.matmul_peak(jnp.bfloat16),
                                                 special))


def test_decode_step_reads_only_the_routed_experts():
    # one token, Mixtral-sized experts: the weight traffic is k of E experts
    t, d, f, e, k = 1, 4096, 14336, 8, 2
    structs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
               ((t, d), (t, e), (e, d, f), (e, d, f), (e, f, d))]
    report = mtia_jax.estimate(lambda *a: moe_ffn(*a, top_k=k), *structs, chip="mtia450")
    expert_bytes = 3 * d * f * 2
    assert report.cost.total("hbm_bytes") == pytest.approx(k * expert_bytes + (2 * d + e) * 2)
    assert report.time_s >= k * expert_bytes / chips.get("mtia450").hbm_bandwidth
    assert math.isclose(report.cost.total("flops"), 6 * k * d * f + 2 * k * f + 2 * k * d)
