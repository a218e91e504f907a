"""mtia-jax's own primitives under the partition pass: flash_attention keeps
batch and heads split; moe_ffn splits tokens and the experts' FFN width."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import mtia_jax
from mtia_jax.primitives.flash_attention import flash_attention
from mtia_jax.primitives.moe_ffn import moe_ffn
from kernels import flat_kinds

MESH = mtia_jax.make_mesh((2, 4), ("data", "model"))


def ns(*spec):
    return NamedSharding(MESH, P(*spec))


def _normal(i, shape):
    return jax.random.normal(jax.random.PRNGKey(i), shape)


def _kinds(f, *args):
    return [k for k in flat_kinds(f.lower(*args).compile().module.ops) if k != "constant"]


def test_flash_attention_with_gqa_and_lengths_runs_on_each_devices_heads():
    q, k, v = _normal(0, (4, 8, 8, 16)), _normal(1, (4, 8, 4, 16)), _normal(2, (4, 8, 4, 16))
    lengths = jnp.array([8, 5, 3, 8], jnp.int32)

    def f(q, k, v, lengths):
        return flash_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)

    heads = ns("data", None, "model")
    g = mtia_jax.jit(f, in_shardings=(heads, heads, heads, ns("data")))
    np.testing.assert_allclose(g(q, k, v, lengths), jax.jit(f)(q, k, v, lengths), rtol=1e-6, atol=1e-6)
    assert _kinds(g, q, k, v, lengths) == ["flash_attention"]  # no communication at all
    (op,) = [o for o in g.lower(q, k, v, lengths).compile().module.ops if o.kind == "flash_attention"]
    assert op.operands[0].type.shape == (2, 8, 2, 16) and op.operands[1].type.shape == (2, 8, 1, 16)


def test_moe_ffn_tensor_parallel_experts_need_one_all_reduce():
    x, logits = _normal(3, (8, 16)), _normal(4, (8, 4))
    w_gate, w_up, w_down = _normal(5, (4, 16, 32)) * 0.1, _normal(6, (4, 16, 32)) * 0.1, _normal(7, (4, 32, 16)) * 0.1

    def f(x, logits, w_gate, w_up, w_down):
        return moe_ffn(x, logits, w_gate, w_up, w_down, top_k=2)

    g = mtia_jax.jit(f, in_shardings=(ns("data"), ns("data"), ns(None, None, "model"),
                                      ns(None, None, "model"), ns(None, "model")))
    args = (x, logits, w_gate, w_up, w_down)
    np.testing.assert_allclose(g(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-6)
    assert _kinds(g, *args) == ["moe_ffn", "all_reduce"]


def test_norms_and_swiglu_keep_rows_and_ffn_width_split():
    from mtia_jax.primitives import rms_norm, swiglu

    def mlp(x, norm, w_gate, w_up, w_down):
        return swiglu(rms_norm(x, norm), w_gate, w_up) @ w_down

    args = (_normal(8, (8, 16)), _normal(9, (16,)), _normal(10, (16, 32)) * 0.2,
            _normal(11, (16, 32)) * 0.2, _normal(12, (32, 16)) * 0.2)
    g = mtia_jax.jit(mlp, in_shardings=(ns("data"), None, ns(None, "model"), ns(None, "model"),
                                        ns("model", None)))
    np.testing.assert_allclose(g(*args), jax.jit(mlp)(*args), rtol=1e-5, atol=1e-5)
    assert _kinds(g, *args) == ["rms_norm", "swiglu", "dot_general", "all_reduce"]


def test_split_along_one_dim_keeps_the_others_split():
    f = lambda x: jnp.split(x, 2, axis=1)[0] * 2.0
    x = _normal(13, (8, 16))
    g = mtia_jax.jit(f, in_shardings=ns("data"))
    np.testing.assert_array_equal(g(x), jax.jit(f)(x))
    assert "all_gather" not in _kinds(g, x)
