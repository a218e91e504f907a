"""Programs large-model code writes every day compile and equal jax.jit:
``jax.checkpoint`` (with its recomputation charged), a ``while_loop`` under
``vmap`` with a per-example predicate, and callbacks into Python
(``jax.debug.print``, ``jax.debug.callback``, ``pure_callback``,
``io_callback``), which run on the host with their round trip modeled."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from jax.experimental import io_callback

import mtia_jax

S = jax.ShapeDtypeStruct


def _equal(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _layers(w, x, checkpoint, policy=None):
    layer = lambda x, w: jnp.tanh(x @ w)
    if checkpoint:
        layer = jax.checkpoint(layer, policy=policy)
    for _ in range(4):
        x = layer(x, w)
    return x.sum()


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.dots_saveable,
                                    jax.checkpoint_policies.nothing_saveable])
def test_checkpoint_forward_and_grad_equal_jax_jit(policy):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 16)) * 0.2, jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    for f in (functools.partial(_layers, checkpoint=True, policy=policy),
              jax.grad(functools.partial(_layers, checkpoint=True, policy=policy))):
        _equal(mtia_jax.jit(f)(w, x), jax.jit(f)(w, x))


def test_recomputation_in_the_backward_pass_is_charged():
    w, x = S((1024, 1024), jnp.float32), S((256, 1024), jnp.float32)
    flops = {remat: mtia_jax.estimate(jax.grad(functools.partial(_layers, checkpoint=remat)), w,
                                      x).flops for remat in (False, True)}
    # without remat: 4 forward matmuls, then per layer the weight gradient and (but for
    # the first layer) the input gradient: 11 x 2 M N K; with remat the forward matmuls
    # of the layers whose activations the backward pass needs run again (3 of them)
    matmul = 2 * 256 * 1024 * 1024
    assert flops[False] >= 11 * matmul
    assert flops[True] - flops[False] >= 3 * matmul
    text = mtia_jax.jit(jax.grad(functools.partial(_layers, checkpoint=True))).lower(w, x).as_text()
    assert "optimization_barrier" in text  # what keeps the recomputation apart


def test_flax_linen_remat_inside_scan():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(16)(x)), None

    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    x = jnp.ones((2, 16))
    params = stack().init(jax.random.key(0), x, None)
    loss = lambda p, x: stack().apply(p, x, None)[0].sum()
    _equal(mtia_jax.jit(loss)(params, x), jax.jit(loss)(params, x))
    _equal(mtia_jax.jit(jax.grad(loss))(params, x), jax.jit(jax.grad(loss))(params, x))


def newton_sqrt(a):
    return lax.while_loop(lambda s: jnp.abs(s[1] * s[1] - s[0]) > 1e-3,
                          lambda s: (s[0], 0.5 * (s[1] + s[0] / s[1])), (a, a))[1]


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_while_loop_under_vmap_with_a_per_example_predicate(mode):
    f = jax.vmap(newton_sqrt)
    x = jnp.array([2.0, 9.0, 100.0, 1e4])
    compiled = mtia_jax.jit(f, mode=mode).lower(x).compile()
    _equal(compiled(x), jax.jit(f)(x))  # each example stops at its own trip
    # the loop runs until the slowest example is done: its trips are what is charged
    trips = []
    for a in np.asarray(x):
        s, n = np.float32(a), 0
        while abs(s * s - a) > np.float32(1e-3):
            s, n = np.float32(0.5) * (s + np.float32(a) / s), n + 1
        trips.append(n)
    (body,) = [k for k in compiled.cost.kernels if "/body/" in k.path]
    assert body.count == max(trips) and min(trips) < max(trips)


def test_debug_print_prints_and_changes_nothing_but_the_transfer(capsys):
    def f(x):
        jax.debug.print("x = {x}", x=x)
        return x * 2.0

    x = jnp.arange(4.0)
    _equal(mtia_jax.jit(f)(x), x * 2.0)
    assert "x = [0. 1. 2. 3.]" in capsys.readouterr().out
    plain = mtia_jax.estimate(lambda x: x * 2.0, S((4,), jnp.float32))
    printed = mtia_jax.estimate(f, S((4,), jnp.float32))
    (host,) = [k for k in printed.cost.kernels if k.stream == "host"]
    assert host.bytes_accessed == 16  # the printed array crosses the host link
    assert printed.flops == plain.flops
    assert printed.time_s <= plain.time_s + host.time_s + 1e-12


def test_debug_callback_runs_even_when_its_result_is_unused():
    seen = []
    f = lambda x: (jax.debug.callback(lambda v: seen.append(np.asarray(v).sum()), x), x + 1)[1]
    _equal(mtia_jax.jit(f)(jnp.ones(3)), jnp.full(3, 2.0))
    assert seen == [3.0]


def test_pure_callback_and_io_callback_equal_jax_jit():
    def f(x):
        y = jax.pure_callback(np.sin, S(x.shape, x.dtype), x)
        z = io_callback(lambda v: np.cos(v).astype(np.float32), S(x.shape, x.dtype), x, ordered=True)
        return y + z

    x = jnp.linspace(0.0, 1.0, 5, dtype=jnp.float32)
    _equal(mtia_jax.jit(f)(x), jax.jit(f)(x))
    host = [k for k in mtia_jax.jit(f).lower(x).compile().cost.kernels if k.stream == "host"]
    assert len(host) == 2 and all(k.transfer_s > 0 for k in host)


@pytest.mark.parametrize("length", [1, 12, 64])
def test_flax_nnx_attention_block_is_bitwise_equal_to_jax_jit_in_graph_mode(length):
    # the attention pass turns the block's jnp attention into one flash_attention
    # kernel whose body keeps the original ops: graph mode computes the same bits
    from flax import nnx

    block = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, decode=False,
                                   rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    f = lambda state, x: nnx.merge(graphdef, state)(x)
    x = jax.random.normal(jax.random.key(length), (2, length, 32))
    compiled = mtia_jax.jit(f).lower(state, x).compile()
    assert "flash_attention" in compiled.as_text()
    _equal(compiled(state, x), jax.jit(f)(state, x))
    assert 0 < compiled.cost_analysis()["time_s"] < float("inf")
