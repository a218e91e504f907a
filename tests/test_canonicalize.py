"""The canonicalize pass: constant folding, CSE, DCE; IR before/after and numerics."""

import jax
import jax.numpy as jnp
import numpy as np

import mtia_jax
from lowering import from_jaxpr
from lowering.passes import canonicalize


def _import(fn, *args):
    return from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args))


def _kinds(module):
    return [op.kind for op in module.ops]


def test_folds_exact_constant_scalar_math():
    def f(q):
        return q / (jnp.float32(q.shape[-1]) * 0.5).astype(q.dtype)

    q = jnp.ones((2, 64), jnp.bfloat16)
    before = _import(f, q)
    assert {"mul", "convert_element_type"} <= set(_kinds(before))
    after = canonicalize.run(before)
    assert _kinds(after) == ["constant", "div"]
    (const,) = [op for op in after.ops if op.kind == "constant"]
    assert const.attrs["value"].dtype == jnp.bfloat16 and float(const.attrs["value"]) == 32.0
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64), jnp.bfloat16)
    np.testing.assert_array_equal(mtia_jax.jit(f)(x), jax.jit(f)(x))


def test_keeps_the_square_root_of_attention_scaling():
    # XLA turns x / sqrt(c) into x * rsqrt(c); folding sqrt first would change bits
    def f(q):
        return q / jnp.sqrt(q.shape[-1]).astype(q.dtype)

    for head_dim in (8, 64):
        q = jax.random.normal(jax.random.PRNGKey(head_dim), (4, head_dim))
        assert "sqrt" in _kinds(canonicalize.run(_import(f, q)))
        np.testing.assert_array_equal(mtia_jax.jit(f)(q), jax.jit(f)(q))


def test_does_not_fold_transcendentals_or_large_results():
    def f(x):
        return x + jnp.exp(jnp.float32(0.3)) + jnp.zeros((64, 64)).sum()

    after = canonicalize.run(_import(f, jnp.ones(3)))
    assert "exp" in _kinds(after)
    assert "broadcast_in_dim" in _kinds(after)  # 4096 elements: left to run time
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(mtia_jax.jit(f)(x), jax.jit(f)(x))


def test_cse_merges_identical_ops():
    def f(x, y):
        return jnp.tanh(x @ y) + jnp.tanh(x @ y)

    before = _import(f, jnp.ones((4, 4)), jnp.ones((4, 4)))
    assert _kinds(before).count("dot_general") == 2 and _kinds(before).count("tanh") == 2
    after = canonicalize.run(before)
    assert _kinds(after) == ["dot_general", "tanh", "add"]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    np.testing.assert_array_equal(mtia_jax.jit(f)(x, x.T), jax.jit(f)(x, x.T))


def test_cse_keeps_ops_with_different_params():
    def f(x):
        return x.sum(0), x.sum(1)

    after = canonicalize.run(_import(f, jnp.ones((3, 3))))
    assert _kinds(after).count("reduce_sum") == 2


def test_canonicalizes_inside_regions():
    def f(x):
        return jax.lax.scan(lambda c, _: (c * (jnp.float32(2.0) + 1.0) + c * (jnp.float32(2.0) + 1.0), None),
                            x, None, length=3)[0]

    after = canonicalize.run(_import(f, jnp.ones(2)))
    (scan,) = [op for op in after.ops if op.kind == "scan"]
    assert _kinds(scan.regions["body"]) == ["constant", "mul", "add"]
    np.testing.assert_array_equal(mtia_jax.jit(f)(jnp.arange(2.0)), jax.jit(f)(jnp.arange(2.0)))
