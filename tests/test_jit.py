"""mtia_jax.jit returns what jax.jit returns, on a table of programs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax

KEY = jax.random.PRNGKey(0)


def _normal(i, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape).astype(dtype)


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def softmax(x):
    return jax.nn.softmax(x, axis=-1)


def layer_norm(x, gamma, beta):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * gamma + beta


def attention(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    scores = jnp.where(mask, scores, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def integer_math(a, b):
    c = (a * 3 + b) // 2 - jnp.abs(a - b)
    d = jnp.where(a > b, c, -c) % 7
    return d.sum(axis=0), jnp.argmax(c, axis=1), jnp.max(d), (a & 0xF) | (b ^ 3)


def bf16_matmul(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def pytree_io(inputs):
    x, (y, z) = inputs["x"], inputs["yz"]
    return {"sum": x + y, "parts": [x * z, jnp.concatenate([x, y], axis=0)[:3]], "none": None}


def slicing(x, i):
    a = jax.lax.dynamic_slice(x, (i, 0), (2, 4))
    b = jax.lax.dynamic_update_slice(x, a * 2, (0, i))
    return b.T.reshape(-1)[::3], jnp.expand_dims(jnp.squeeze(x[:1]), 0), jnp.arange(5) + i


def reductions(x):
    return (x.sum(0), x.max(1), x.min(), jnp.prod(x[:2, :3] * 0.5 + 1), jnp.argmin(x, axis=0),
            jnp.any(x > 1.0), jnp.all(x > -5.0))


def math_ops(x):
    y = jnp.abs(x) + 0.5
    return (jnp.exp(x), jnp.log(y), jnp.tanh(x), jax.nn.sigmoid(x), jnp.sqrt(y), jax.lax.rsqrt(y),
            jnp.sign(x), x ** 3, y ** 1.7, jax.scipy.special.erf(x), -x, jnp.maximum(x, 0.1),
            jnp.minimum(x, 0.1), x != 0.5, x <= 0.1, jnp.logical_not(x > 0))


def custom_rules(x):
    return jax.nn.gelu(x), jax.nn.logsumexp(x, axis=-1), jax.nn.relu6(x), jax.nn.silu(x)


PROGRAMS = {
    "mlp": (mlp, lambda: ([(_normal(1, (8, 32)), _normal(2, (32,))), (_normal(3, (32, 32)), _normal(4, (32,))),
                           (_normal(5, (32, 4)), _normal(6, (4,)))], _normal(7, (16, 8)))),
    "softmax": (softmax, lambda: (_normal(8, (4, 33)),)),
    "layer_norm": (layer_norm, lambda: (_normal(9, (6, 64)), _normal(10, (64,)), _normal(11, (64,)))),
    "attention": (attention, lambda: (_normal(12, (2, 8, 2, 16)), _normal(13, (2, 8, 2, 16)),
                                      _normal(14, (2, 8, 2, 16)))),
    "integer_math": (integer_math, lambda: (jax.random.randint(KEY, (5, 7), -50, 50),
                                            jax.random.randint(jax.random.fold_in(KEY, 1), (5, 7), -50, 50))),
    "bf16_matmul": (bf16_matmul, lambda: (_normal(15, (16, 64), jnp.bfloat16), _normal(16, (64, 32), jnp.bfloat16))),
    "pytree_io": (pytree_io, lambda: ({"x": _normal(17, (4, 3)), "yz": (_normal(18, (4, 3)), 2.0)},)),
    "slicing": (slicing, lambda: (_normal(19, (6, 8)), jnp.int32(3))),
    "reductions": (reductions, lambda: (_normal(20, (5, 6)),)),
    "math_ops": (math_ops, lambda: (_normal(21, (3, 10)),)),
    "custom_rules": (custom_rules, lambda: (_normal(22, (4, 9)),)),
}


def _assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_graph_mode_equals_jax_jit_bitwise(name):
    fn, make_args = PROGRAMS[name]
    args = make_args()
    _assert_tree_equal(mtia_jax.jit(fn)(*args), jax.jit(fn)(*args))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_eager_mode_matches_jax_jit(name):
    # Eager mode runs one XLA computation per kernel; XLA may contract a
    # multiply-add inside a fused graph, so floats agree to a few ulp.
    fn, make_args = PROGRAMS[name]
    args = make_args()
    got, want = mtia_jax.jit(fn, mode="eager")(*args), jax.jit(fn)(*args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if jnp.issubdtype(w.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                       rtol=2e-6 if w.dtype == jnp.float32 else 1e-2, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_static_argnums_and_argnames():
    def f(x, n, *, scale):
        return jnp.tile(x, n) * scale

    g = mtia_jax.jit(f, static_argnums=1, static_argnames="scale")
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(g(x, 2, scale=3.0), f(x, 2, scale=3.0))
    np.testing.assert_array_equal(g(x, 3, scale=3.0), f(x, 3, scale=3.0))
    np.testing.assert_array_equal(g(x, n=2, scale=1.0), f(x, 2, scale=1.0))
    assert len(g._cache) == 3


def test_static_args_must_be_hashable():
    g = mtia_jax.jit(lambda x, shape: x.reshape(shape), static_argnums=1)
    with pytest.raises(TypeError, match="hashable"):
        g(jnp.ones(4), [2, 2])


def test_cache_keys_on_shape_dtype_and_weak_type():
    g = mtia_jax.jit(lambda x, y: x * y)
    y = jnp.ones(3, jnp.bfloat16)
    assert g(2.0, y).dtype == jax.jit(lambda x, y: x * y)(2.0, y).dtype == jnp.bfloat16
    g(jnp.float32(2.0), y)
    g(jnp.ones(3), jnp.ones(3))
    g(jnp.ones(3), jnp.ones(3))
    assert len(g._cache) == 3


def test_decorator_forms_and_wrapping():
    @mtia_jax.jit
    def f(x):
        """doc"""
        return x + 1

    @mtia_jax.jit(chip="mtia400")
    def g(x):
        return x * 2

    assert f.__name__ == "f" and f.__doc__ == "doc"
    assert f(1.0) == 2.0 and g(1.0) == 2.0
    assert g.lower(1.0).chip.name == "mtia400"


def test_composes_with_jax_transforms():
    w = _normal(30, (4, 3))
    f = mtia_jax.jit(lambda x: jnp.tanh(x @ w).sum())
    x = _normal(31, (2, 4))
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(lambda x: jnp.tanh(x @ w).sum())(x), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x[:, None]), jax.vmap(lambda x: jnp.tanh(x @ w).sum())(x[:, None]),
                               rtol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-6)


def test_closure_constants_and_literal_outputs():
    table = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    f = lambda i: (jnp.asarray(table)[i], 7, jnp.float32(1.5))
    got, want = mtia_jax.jit(f)(1), jax.jit(f)(1)
    _assert_tree_equal(got, want)


def test_donate_argnums_frees_the_donated_input():
    def f(x, y):
        return jnp.tanh(x) + y

    x, y = jnp.ones((256, 256)), jnp.ones((256, 256))
    kept = mtia_jax.jit(f).lower(x, y).compile()
    donated = mtia_jax.jit(f, donate_argnums=0).lower(x, y).compile()
    nbytes = 256 * 256 * 4
    # one fused kernel; without donation x, y and the output are live at once,
    # with x donated the output is written in place over x
    assert kept.cost_analysis()["peak_hbm_bytes"] == 3 * nbytes
    assert donated.cost_analysis()["peak_hbm_bytes"] == 2 * nbytes
    np.testing.assert_array_equal(mtia_jax.jit(f, donate_argnums=0)(jnp.ones((4, 4)), jnp.ones((4, 4))),
                                  f(jnp.ones((4, 4)), jnp.ones((4, 4))))


def test_unknown_mode_and_chip_are_clear_errors():
    with pytest.raises(ValueError, match="graph"):
        mtia_jax.jit(lambda x: x, mode="fast")
    with pytest.raises(ValueError, match="mtia450"):
        mtia_jax.jit(lambda x: x, chip="mtia9000")


def test_compiled_call_checks_structure():
    compiled = mtia_jax.jit(lambda x, y: x + y).lower(1.0, 2.0).compile()
    assert compiled(1.0, 2.0) == 3.0
    with pytest.raises(TypeError, match="structure"):
        compiled((1.0, 2.0))
