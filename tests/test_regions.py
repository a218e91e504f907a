"""Region ops: scan, while and cond import as nested functions, run on the
host like jax.jit, and are charged per execution in the cost model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from lowering import from_jaxpr
from runtime.executor import counted_loops


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def rnn(params, xs, h0):
    w_x, w_h, b = params

    def cell(h, x):
        h = jnp.tanh(x @ w_x + h @ w_h + b)
        return h, h.sum()

    return lax.scan(cell, h0, xs)


def collatz_steps(n):
    def cond(state):
        return state[0] != 1

    def body(state):  # the scalar state runs on the control core, the vector in a kernel
        v, steps, x = state
        return jnp.where(v % 2 == 0, v // 2, 3 * v + 1), steps + 1, jnp.sin(x)

    return lax.while_loop(cond, body, (n, 0, jnp.ones(256)))[1]


def nested(x, n):
    def outer(c, xi):
        inner = lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] * 1.5), (0, c))[1]
        branch = lax.switch(jnp.clip(n - 2, 0, 2), [lambda a: a, lambda a: a * 2, lambda a: -a], inner)
        return branch + xi, lax.cond(xi.sum() > 0, lambda: 1.0, lambda: 0.0)

    return lax.scan(outer, jnp.zeros(x.shape[1:]), x, reverse=True)


KEY = jax.random.PRNGKey(0)
RNN_ARGS = ((jax.random.normal(KEY, (3, 8)), jax.random.normal(jax.random.fold_in(KEY, 1), (8, 8)) * 0.3,
             jnp.zeros(8)), jax.random.normal(jax.random.fold_in(KEY, 2), (5, 2, 3)), jnp.zeros((2, 8)))


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_scan_rnn_equals_jax_jit(mode):
    _assert_same(mtia_jax.jit(rnn, mode=mode)(*RNN_ARGS), jax.jit(rnn)(*RNN_ARGS))


@pytest.mark.parametrize("n", [1, 6, 27])
def test_while_loop_equals_jax_jit(n):
    assert int(mtia_jax.jit(collatz_steps)(n)) == int(jax.jit(collatz_steps)(n))


@pytest.mark.parametrize("n", [1, 3, 4, 5])
def test_nested_regions_equal_jax_jit(n):
    x = jax.random.normal(KEY, (4, 3))
    _assert_same(mtia_jax.jit(nested)(x, n), jax.jit(nested)(x, n))


def test_fori_loop_and_grad_through_scan():
    f = lambda x: lax.fori_loop(0, 4, lambda i, a: a * 1.1 + i, x)
    x = jnp.arange(3.0)
    _assert_same(mtia_jax.jit(f)(x), jax.jit(f)(x))
    loss = lambda p: rnn(p, RNN_ARGS[1], RNN_ARGS[2])[1].sum()
    got = jax.grad(mtia_jax.jit(loss))(RNN_ARGS[0])
    want = jax.grad(jax.jit(loss))(RNN_ARGS[0])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_regions_print_as_nested_functions():
    text = mtia_jax.jit(nested).lower(jnp.ones((4, 3)), 2).as_text()
    for name in ("func @scan_body", "func @while_cond", "func @while_body", "func @cond_branch2"):
        assert name in text
    assert "reverse=True" in text and "length=4" in text


def test_scan_cost_is_length_times_body():
    chip = mtia_jax.chips.get("mtia450")
    xs = jax.ShapeDtypeStruct((7, 2, 3), jnp.float32)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), RNN_ARGS[0])
    h0 = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    compiled = mtia_jax.jit(rnn).lower(params, xs, h0).compile()
    body = [k for k in compiled.cost.kernels if "/body/" in k.path]
    assert body and all(k.count == 7 for k in body)
    # per step: matmuls (2,3)@(3,8) and (2,8)@(8,8), two adds of (2,8), and a sum
    # of 16 values to one (15 additions, XLA's convention)
    per_step = (2 * 2 * 3 * 8 + 2 * 2 * 8 * 8) + 2 * 16 + 15
    assert sum(k.flops for k in body) == 7 * per_step
    assert compiled.cost_analysis()["time_s"] >= 7 * 2 * chip.kernel_launch_s


def test_while_trip_count_is_measured_at_run_time():
    f = mtia_jax.jit(collatz_steps)
    compiled = f.lower(27).compile()
    with pytest.warns(mtia_jax.errors.UnmeasuredLoopWarning, match=r"1 while loop\(s\) .*test_regions.py:\d+ "
                                                            r"\(collatz_steps\).*Call the compiled function once"):
        analysis = compiled.cost_analysis()
    assert analysis["unmeasured_loops"] == 1
    before = analysis["time_s"]
    assert int(compiled(27)) == 111
    after = compiled.cost_analysis()
    assert after["unmeasured_loops"] == 0
    body = [k for k in compiled.cost.kernels if "/body/" in k.path]
    assert body and all(k.count == 111 for k in body)
    assert after["time_s"] > 50 * before


def test_nested_while_counts_accumulate_over_scan_iterations():
    x = jnp.ones((4, 3))
    compiled = mtia_jax.jit(nested).lower(x, 5).compile()
    compiled(x, 5)
    (path,) = counted_loops(compiled.module)
    assert "/body/" in path and set(compiled._trip_counts) == {path}
    assert int(compiled._trip_counts[path]) == 4 * 5  # 4 scan steps x 5 trips


def test_cond_charges_the_costliest_branch():
    def f(p, x):
        return lax.cond(p, lambda v: v + 1, lambda v: jnp.tanh(v @ v.T) @ v, x)

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    compiled = mtia_jax.jit(f).lower(True, x).compile()
    kinds = [k.kind for k in compiled.cost.kernels]
    assert "dot_general" in kinds and "add" not in kinds


def test_region_bodies_are_separate_modules():
    closed = jax.make_jaxpr(collatz_steps)(3)
    module = from_jaxpr.import_closed_jaxpr(closed)
    (loop,) = [op for op in module.ops if op.kind == "while"]
    assert set(loop.regions) == {"cond", "body"}
    assert len(loop.regions["body"].params) == 3  # the carried (v, steps, x)


def test_compiles_inside_an_outer_jax_trace():
    # first compile happens while jax.jit traces; constant folding must not see tracers
    assert int(jax.jit(mtia_jax.jit(collatz_steps))(27)) == 111
