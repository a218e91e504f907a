"""The fusion pass: which ops group into fused kernels, that the program stays
in dependency order with unchanged numerics, and what it saves in HBM bytes."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering.ir import verify
from lowering import from_jaxpr
from lowering.passes import canonicalize, fusion
from runtime.cost_model import program_cost

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import programs  # noqa: E402

CHIP = mtia_jax.chips.get("mtia450")


def _modules(fn, *args):
    before = canonicalize.run(from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args)))
    return before, fusion.run(before)


def _kernels(module):
    return [op for op in module.ops if op.kind not in ("constant", "reshape", "squeeze", "expand_dims")]


def _check_order(module):
    verify(module)


def test_elementwise_chain_becomes_one_kernel():
    before, after = _modules(lambda x, y: jnp.tanh(x * 2.0 + y) - y, jnp.ones((8, 8)), jnp.ones((8, 8)))
    assert [op.kind for op in _kernels(before)] == ["mul", "add", "tanh", "sub"]
    (fused,) = _kernels(after)
    assert fused.kind == "fused_kernel" and fused.attrs["pattern"] == "elementwise"
    assert fused.attrs["ops"] == "mul+add+tanh+sub"
    assert [v for v in fused.operands if v.type.size > 1] == before.params  # plus the scalar 2.0
    assert fused.results == before.outputs


def test_matmul_epilogue_with_bias_broadcast_recomputed_inside():
    def f(x, w, b):
        return jax.nn.relu(x @ w + b)

    before, after = _modules(f, jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones(16))
    (fused,) = _kernels(after)
    assert fused.attrs["pattern"] == "matmul"
    assert fused.attrs["ops"] == "dot_general+broadcast_in_dim+add+max"
    # HBM: x, w, b in and the output; no intermediate round trips
    cost = program_cost(after, CHIP)
    assert cost.total("hbm_bytes") == 4 * (4 * 8 + 8 * 16 + 16 + 4 * 16)
    assert "func @fused_matmul" in after.as_text()


def test_a_widening_convert_at_a_groups_end_is_left_to_its_readers():
    # the residual sum (bf16) leaves the matmul's kernel for a later add; the
    # float32 convert of it feeds a reduction: kept in the group it would write
    # 2 x the bytes again, so it leaves the group and is recomputed by its reader
    def f(x, w, r):
        y = r + x @ w
        return y + 1, jnp.sum(y.astype(jnp.float32), axis=-1)

    args = (jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16), jnp.ones((4, 16), jnp.bfloat16))
    _, after = _modules(f, *args)
    matmul = next(op for op in after.ops if op.attrs.get("pattern") == "matmul")
    assert "convert_element_type" not in matmul.attrs["ops"]
    # it writes y + 1 and y in bf16, not y in float32 as well
    assert [r.type.dtype for r in matmul.results] == [jnp.dtype(jnp.bfloat16)] * 2
    compiled = mtia_jax.jit(f).lower(*args).compile()
    np.testing.assert_array_equal(compiled(*args)[1], jax.jit(f)(*args)[1])


def test_softmax_fuses_producers_into_reductions():
    before, after = _modules(lambda x: jax.nn.softmax(x, axis=-1), jnp.ones((32, 128)))
    kernels = _kernels(after)
    # max over x; then x - max, exp and the sum in one pass; then the division
    assert [op.kind for op in kernels] == ["reduce_max", "fused_kernel", "fused_kernel"]
    assert kernels[1].attrs["pattern"] == "reduction" and "exp" in kernels[1].attrs["ops"]
    assert kernels[2].attrs["pattern"] == "elementwise" and "div" in kernels[2].attrs["ops"]
    assert len(_kernels(before)) > 2 * len(kernels)


def test_value_used_outside_a_group_becomes_an_output():
    def f(x):
        a = jnp.exp(x)
        s = a.sum()       # closes the group holding exp
        return a * s      # reads exp's value from outside

    _, after = _modules(f, jnp.ones((16,)))
    _check_order(after)
    first = _kernels(after)[0]
    assert len(first.results) == 2  # exp's value and the sum


def test_no_fusion_that_would_break_dependency_order():
    def f(x, w):
        a = x + 1.0
        b = a @ w           # reads a
        return a * 2.0 + b  # joining a's group would need b first

    before, after = _modules(f, jnp.ones((4, 4)), jnp.ones((4, 4)))
    _check_order(after)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    np.testing.assert_array_equal(mtia_jax.jit(f)(x, x.T), jax.jit(f)(x, x.T))


@pytest.mark.parametrize("fn, args", [
    (programs.mlp, programs.make_mlp(jax.random.PRNGKey(1), dims=(16, 32, 8), batch=4)),
    (programs.transformer, programs.make_transformer(jax.random.PRNGKey(2), d=32, seq=8)),
    (programs.rnn_scan, programs.make_rnn(jax.random.PRNGKey(3), d=8, steps=4, batch=2)),
])
def test_fused_programs_keep_numerics_bit_for_bit(fn, args):
    _, after = _modules(fn, *args)
    _check_order(after)
    got, want = mtia_jax.jit(fn)(*args), jax.jit(fn)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


def test_transformer_block_hbm_bytes_drop_by_at_least_40_percent():
    shapes = jax.eval_shape(lambda: programs.make_transformer(
        jax.random.PRNGKey(0), d=256, batch=2, seq=128, dtype=jnp.bfloat16))
    before, after = _modules(programs.transformer, *shapes)
    off, on = program_cost(before, CHIP), program_cost(after, CHIP)
    cut = 1 - on.total("hbm_bytes") / off.total("hbm_bytes")
    assert cut >= 0.40, cut
    assert on.time_s < off.time_s
    assert on.total("flops") == off.total("flops")
