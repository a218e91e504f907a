"""Precision policies and the dtype pass (lowering.passes.precision)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering.ir import Module, Op, TensorType, Value
from lowering.passes import precision as precision_pass
from lowering.pipeline import PassContext
from mtia_jax import chips, mx
from mtia_jax.precision import PrecisionPolicy, precision_policy
from mtia_jax.primitives.mx_matmul import mx_matmul, mx_matmul_p
from kernels import flat_kinds, ops_of_kind

W4A8 = PrecisionPolicy(weights="mx4", activations="mx8")


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(f"u{got.dtype.itemsize}"),
                                  want.view(f"u{want.dtype.itemsize}"))


def _compiled(f, *args, policy=W4A8, **kw):
    return mtia_jax.jit(f, precision=policy, **kw).lower(*args).compile()


def _formats(compiled):
    return [(op.params["a_format"], op.params["b_format"]) for op in ops_of_kind(compiled.module, "mx_matmul")]


def mlp(x, w1, b1, w2):
    return jax.nn.gelu(x @ w1 + b1) @ w2


def _mlp_args(dtype=jnp.float32):
    x = _normal(0, (2, 8, 64)).astype(dtype)
    return x, (_normal(1, (64, 96), 0.1)).astype(dtype), _normal(2, (96,)).astype(dtype), \
        (_normal(3, (96, 64), 0.1)).astype(dtype)


# ------------------------------------------------------------ no policy

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_without_a_policy_nothing_changes(dtype):
    args = _mlp_args(dtype)
    compiled = mtia_jax.jit(mlp).lower(*args).compile()
    assert not ops_of_kind(compiled.module, "mx_matmul")
    _same_bits(compiled(*args), jax.jit(mlp)(*args))
    # and the pass itself is the identity without a policy
    module = mtia_jax.jit(mlp).lower(*args).module
    assert precision_pass.run(module, PassContext(chip=chips.get("mtia450"))) is module


def test_policy_without_formats_changes_nothing():
    args = _mlp_args()
    compiled = _compiled(mlp, *args, policy=PrecisionPolicy())
    assert not ops_of_kind(compiled.module, "mx_matmul")
    _same_bits(compiled(*args), jax.jit(mlp)(*args))


# ------------------------------------------------------------ weight matmuls

def test_weight_matmuls_become_mx_matmul_equal_to_the_primitive_by_hand():
    x, w1, b1, w2 = _mlp_args()
    compiled = _compiled(mlp, x, w1, b1, w2)
    assert _formats(compiled) == [("mxfp8_e4m3", "mxfp4_e2m1")] * 2
    assert "dot_general" not in compiled.as_text()
    assert "a_format=mxfp8_e4m3, b_format=mxfp4_e2m1" in compiled.as_text()

    def by_hand(x, w1, b1, w2):
        h = jax.nn.gelu(mx_matmul(x, w1, a_format="mx8", b_format="mx4") + b1)
        return mx_matmul(h, w2, a_format="mx8", b_format="mx4")

    _same_bits(compiled(x, w1, b1, w2), jax.jit(by_hand)(x, w1, b1, w2))
    # the numerics really changed (quantized) but stay close
    y, y0 = np.asarray(compiled(x, w1, b1, w2)), np.asarray(mlp(x, w1, b1, w2))
    assert 1e-3 < np.linalg.norm(y - y0) / np.linalg.norm(y0) < 0.3


def test_grad_through_the_compiled_program_is_straight_through():
    x, w1, b1, w2 = _mlp_args()
    loss = lambda f: (lambda *args: jnp.sum(jnp.tanh(f(*args))))

    def by_hand(x, w1, b1, w2):
        h = jax.nn.gelu(mx_matmul(x, w1, a_format="mx8", b_format="mx4") + b1)
        return mx_matmul(h, w2, a_format="mx8", b_format="mx4")

    got = jax.grad(loss(mtia_jax.jit(mlp, precision=W4A8)), (0, 1, 2, 3))(x, w1, b1, w2)
    want = jax.grad(loss(by_hand), (0, 1, 2, 3))(x, w1, b1, w2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_policy_from_a_with_block_and_weights_only():
    x, w1, b1, w2 = _mlp_args()
    with precision_policy(weights="mxfp6_e3m2"):
        compiled = mtia_jax.jit(mlp).lower(x, w1, b1, w2).compile()
    assert _formats(compiled) == [(None, "mxfp6_e3m2")] * 2

    def by_hand(x, w1, b1, w2):
        h = jax.nn.gelu(mx_matmul(x, w1, b_format="mxfp6_e3m2") + b1)
        return mx_matmul(h, w2, b_format="mxfp6_e3m2")

    _same_bits(compiled(x, w1, b1, w2), jax.jit(by_hand)(x, w1, b1, w2))


def test_weight_through_views_converts_and_transposes_and_on_the_left():
    x, w, v = _normal(4, (8, 64)), _normal(5, (96, 64), 0.1), _normal(6, (32, 2, 8), 0.1)

    def f(x, w, v):
        h = x @ w.astype(jnp.bfloat16).T.astype(jnp.float32)    # (8, 96): weight via converts
        return v.reshape(32, 16) @ h[:, :16].T                  # weight on the left: (32, 8)

    compiled = _compiled(f, x, w, v)
    assert _formats(compiled) == [("mxfp8_e4m3", "mxfp4_e2m1"), ("mxfp4_e2m1", "mxfp8_e4m3")]

    def by_hand(x, w, v):
        h = mx_matmul(x, w.astype(jnp.bfloat16).T.astype(jnp.float32), a_format="mx8", b_format="mx4")
        return mx_matmul(v.reshape(32, 16), h[:, :16].T, a_format="mx4", b_format="mx8")

    _same_bits(compiled(x, w, v), jax.jit(by_hand)(x, w, v))


def test_contraction_not_innermost_gets_a_transpose_and_several_axes_flatten_into_k():
    # out projection of attention heads: contract over (heads, head_dim) at once
    x, w = _normal(7, (2, 5, 4, 16)), _normal(8, (4, 16, 32), 0.1)
    f = lambda x, w: jnp.einsum("bthd,hdD->btD", x, w)
    compiled = _compiled(f, x, w)
    assert _formats(compiled) == [("mxfp8_e4m3", "mxfp4_e2m1")]
    # K is flattened in the weight's (h, d) order: no transpose of either operand
    kinds = flat_kinds(compiled.module.ops)
    assert kinds.count("mx_matmul") == 1 and "transpose" not in kinds
    by_hand = lambda x, w: mx_matmul(x.reshape(10, 64), w.reshape(64, 32), a_format="mx8",
                                     b_format="mx4").reshape(2, 5, 32)
    _same_bits(compiled(x, w), jax.jit(by_hand)(x, w))
    # the weight contracted on its last axis: transposed to (K, N) in the program
    g = lambda x, w: jnp.einsum("td,fd->tf", x, w)
    x2, w2 = _normal(9, (6, 64)), _normal(10, (24, 64))
    compiled = _compiled(g, x2, w2)
    assert flat_kinds(compiled.module.ops) == ["transpose", "mx_matmul"]
    _same_bits(compiled(x2, w2), jax.jit(lambda x, w: mx_matmul(x, w.T, a_format="mx8",
                                                                b_format="mx4"))(x2, w2))


def test_left_alone_batched_integer_and_activation_products():
    x, e = _normal(11, (6, 64)), _normal(12, (3, 6, 64))
    experts = _normal(13, (3, 64, 16))
    cases = {
        "batched weight (MoE experts)": (lambda e, w: jnp.einsum("ebd,edf->ebf", e, w), (e, experts)),
        "integers": (lambda a, b: a @ b, (jnp.ones((4, 8), jnp.int32), jnp.ones((8, 2), jnp.int32))),
        "activations only": (lambda x: jnp.tanh(x) @ jnp.tanh(x).T, (x,)),
    }
    for name, (f, args) in cases.items():
        compiled = _compiled(f, *args)
        assert not ops_of_kind(compiled.module, "mx_matmul"), name
        _same_bits(compiled(*args), jax.jit(f)(*args))


def attention_scores(q, k):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k)


def test_attention_matmuls_are_rewritten_only_with_policy_attention():
    # the KV cache is a program argument, but the product has batch dims: not a weight
    q, k = _normal(14, (2, 3, 4, 32)), _normal(15, (2, 5, 4, 32))
    assert not ops_of_kind(_compiled(attention_scores, q, k).module, "mx_matmul")
    policy = PrecisionPolicy(weights="mx4", activations="mx8", attention=True)
    compiled = _compiled(attention_scores, q, k, policy=policy)
    assert _formats(compiled) == [("mxfp8_e4m3", "mxfp8_e4m3")]

    def by_hand(q, k):
        a = q.transpose(0, 2, 1, 3).reshape(8, 3, 32)
        b = k.transpose(0, 2, 3, 1).reshape(8, 32, 5)
        return mx_matmul(a, b, a_format="mx8", b_format="mx8").reshape(2, 4, 3, 5)

    _same_bits(compiled(q, k), jax.jit(by_hand)(q, k))


# ------------------------------------------------------------ control flow

def test_weights_inside_scan_while_and_cond_bodies():
    ws, w0, x = _normal(16, (3, 64, 64), 0.1), _normal(17, (64, 64), 0.1), _normal(18, (4, 64))

    def f(ws, w0, x):
        def layer(h, w):                       # stacked weights scanned over, and a const
            return jnp.tanh(h @ w + h @ w0), None
        h, _ = jax.lax.scan(layer, x, ws)
        _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ w0), (0, h))
        h = jax.lax.cond(h.sum() > 0, lambda h: h @ w0, lambda h: -h @ w0, h)
        return jax.lax.scan(lambda c, _: (c @ c.T[:, :4] @ x, None), h, None, length=1)[0]

    compiled = _compiled(f, ws, w0, x)
    module = compiled.module
    (scan_op, *_), (while_op,), (cond_op,) = (ops_of_kind(module, k) for k in ("scan", "while", "cond"))
    assert len(ops_of_kind(scan_op.regions["body"], "mx_matmul")) == 2
    assert len(ops_of_kind(while_op.regions["body"], "mx_matmul")) == 1
    assert all(len(ops_of_kind(r, "mx_matmul")) == 1 for r in cond_op.regions.values())
    # the loop-carried product (c @ c.T) is not a weight matmul; `... @ x` is
    last_scan = ops_of_kind(module, "scan")[-1]
    assert len(ops_of_kind(last_scan.regions["body"], "dot_general")) == 1
    assert len(ops_of_kind(last_scan.regions["body"], "mx_matmul")) == 1

    mm = lambda a, b: mx_matmul(a, b, a_format="mx8", b_format="mx4")

    def by_hand(ws, w0, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(mm(h, w) + mm(h, w0)), None), x, ws)
        _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, mm(c[1], w0)), (0, h))
        h = jax.lax.cond(h.sum() > 0, lambda h: mm(h, w0), lambda h: mm(-h, w0), h)
        return jax.lax.scan(lambda c, _: (mm(c @ c.T[:, :4], x), None), h, None, length=1)[0]

    _same_bits(compiled(ws, w0, x), jax.jit(by_hand)(ws, w0, x))


def test_ops_with_bodies_other_than_control_flow_are_left_alone():
    # a flash_attention-style op (computed by its body) whose body multiplies a weight
    w = Value(TensorType((64, 32), np.dtype(np.float32)))
    x = Value(TensorType((4, 64), np.dtype(np.float32)))
    inner_w, inner_x = (Value(v.type) for v in (w, x))
    out_inner = Value(TensorType((4, 32), np.dtype(np.float32)))
    dot = Op("dot_general", [inner_x, inner_w], [out_inner],
             {"primitive": jax.lax.dot_general_p,
              "params": {"dimension_numbers": (((1,), (0,)), ((), ())), "precision": None,
                         "preferred_element_type": np.dtype(np.float32), "out_sharding": None}})
    body = Module("body", [inner_x, inner_w], [dot], [out_inner])
    out = Value(out_inner.type)
    for kind in ("flash_attention", "fused_kernel"):
        op = Op(kind, [x, w], [out], {}, regions={"body": body})
        module = Module("main", [x, w], [op], [out])
        result = precision_pass.run(module, PassContext(chip=chips.get("mtia450"), precision=W4A8))
        assert result.ops[0].regions["body"] is body and body.ops == [dot]


# ------------------------------------------------------------ cost

def test_estimate_under_a_policy_charges_packed_weights():
    x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
    report = mtia_jax.estimate(lambda x, w: x @ w, x, w, chip="mtia450", precision=W4A8)
    (kernel,) = report.cost.kernels
    assert kernel.kind == "mx_matmul"
    packed = 8 * 512 + 8 * 16 + 512 * 1024 // 2 + 16 * 1024 + 8 * 1024 * 2
    tile = report.module.ops[0].attrs["tile"]
    assert kernel.hbm_bytes == packed + tile.extra_hbm_bytes


def test_acceptance_decode_matmul_with_mx4_weights_is_at_least_2x_faster_on_mtia450():
    x = jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16)
    matmul = lambda x, w: x @ w
    bf16 = mtia_jax.estimate(matmul, x, w, chip="mtia450")
    mx4 = mtia_jax.estimate(matmul, x, w, chip="mtia450", precision=W4A8)
    assert [k.kind for k in bf16.cost.kernels] == ["dot_general"]
    assert [k.kind for k in mx4.cost.kernels] == ["mx_matmul"]
    assert bf16.time_s / mx4.time_s >= 2.0
