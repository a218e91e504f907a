"""The attention pattern pass: jnp attention becomes one flash_attention op
whose body holds the matched ops, numerics stay bit for bit those of jax.jit,
the modeled HBM traffic drops, and programs it must not touch are left alone."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from lowering.ir import verify
from lowering import from_jaxpr, pipeline
from lowering.passes import attention, canonicalize
from mtia_jax.primitives.flash_attention import flash_attention
from runtime.cost_model import program_cost

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import programs  # noqa: E402
import quickstart  # noqa: E402

CHIP = mtia_jax.chips.get("mtia450")
CTX = pipeline.PassContext(chip=CHIP)


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _modules(fn, *args):
    before = canonicalize.run(from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args)))
    return before, attention.run(before, CTX)


def _flash_ops(module):
    return [op for op in module.ops if op.kind == "flash_attention"]


def _assert_bitwise(fn, *args, mode="graph"):
    got, want = mtia_jax.jit(fn, mode=mode)(*args), jax.jit(fn)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.view(f"u{g.dtype.itemsize}"), w.view(f"u{w.dtype.itemsize}"))


def _check_order(module):
    verify(module)


def _qkv(b=2, t=16, n=4, kv=None, h=16, s=None, dtype=jnp.float32):
    kv, s = kv or n, s or t
    return _normal(1, (b, t, n, h), dtype), _normal(2, (b, s, kv, h), dtype), _normal(3, (b, s, kv, h), dtype)


def _dpa(**kwargs):
    return lambda q, k, v, *extra: jax.nn.dot_product_attention(
        q, k, v, *extra, implementation="xla", **kwargs)


def _gqa_repeat(q, k, v):
    groups = q.shape[2] // k.shape[2]
    return quickstart.attention(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2))


def _gqa_grouped_einsum(q, k, v):
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k) * (h ** -0.5)
    out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, t, n, h)


def _bhtd_layout(q, k, v):
    # heads before the sequence: (B, N, T, H)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v).transpose(0, 2, 1, 3)


# ------------------------------------------------------------ recognised

def test_quickstart_attention_becomes_one_op_holding_the_matched_ops():
    q, k, v = _qkv()
    before, after = _modules(quickstart.attention, q, k, v)
    assert Counter(op.kind for op in before.ops)["dot_general"] == 2
    (op,) = after.ops
    assert op.kind == "flash_attention" and op.operands == before.params
    assert op.results == before.outputs
    t = 16
    assert {k: op.attrs[k] for k in ("pattern", "batch", "q_len", "kv_len", "heads", "kv_heads",
                                     "head_dim", "mask")} == {
        "pattern": "jnp attention", "batch": 2, "q_len": t, "kv_len": t, "heads": 4,
        "kv_heads": 4, "head_dim": 16, "mask": "causal"}
    assert op.attrs["visible"] == pytest.approx(t * (t + 1) / 2 / t ** 2)
    # the body is the program's ops, unchanged in kind and attributes
    body = op.regions["body"]
    assert sorted(o.kind for o in body.ops) == sorted(o.kind for o in before.ops)
    text = after.as_text()
    assert "flash_attention(" in text and "pattern=jnp attention" in text and "mask=causal" in text
    assert "func @flash_attention_body" in text
    assert "flash_attention" not in before.as_text()


@pytest.mark.parametrize("dtype, mode", [(jnp.float32, "graph"), (jnp.bfloat16, "graph"),
                                         (jnp.float32, "eager")])
def test_quickstart_numerics_bit_for_bit(dtype, mode):
    # eager mode runs the body op by op: compared in float32 only (XLA keeps a
    # fused bfloat16 chain in float32 under jit, op by op rounds every step)
    _assert_bitwise(quickstart.attention, *_qkv(dtype=dtype), mode=mode)


def test_benchmark_transformer_block_and_fusion_around_the_op():
    d, t = 32, 8
    x = _normal(4, (2, t, d))
    p = programs.block_params(jax.random.PRNGKey(5), d)
    _, after = _modules(programs.transformer_block, x, p)
    (op,) = _flash_ops(after)
    assert (op.attrs["heads"], op.attrs["head_dim"], op.attrs["q_len"]) == (8, d // 8, t)
    # the whole pipeline: the flash_attention op stays one top-level kernel,
    # the ops around it still fuse (layer norms, projections' epilogues)
    optimized, _ = mtia_jax.jit(programs.transformer_block).lower(x, p).optimize()
    _check_order(optimized)
    kinds = [o.kind for o in optimized.ops]
    assert kinds.count("flash_attention") == 1
    assert kinds.count("fused_kernel") >= 2
    for o in optimized.ops:
        if o.kind == "fused_kernel":
            assert all(inner.kind != "flash_attention" for inner in o.regions["body"].ops)
    _assert_bitwise(programs.transformer_block, x, p)


@pytest.mark.parametrize("fn, kv", [(_gqa_repeat, 2), (_gqa_grouped_einsum, 2), (_dpa(), 2),
                                    (_dpa(), 1), (_bhtd_layout, 4)])
def test_gqa_and_layouts(fn, kv):
    q, k, v = _qkv(n=4, kv=kv)
    _, after = _modules(fn, q, k, v)
    (op,) = after.ops
    assert op.operands[:3] == [*after.params][:3] or set(op.operands) == set(after.params)
    assert (op.attrs["batch"], op.attrs["heads"], op.attrs["kv_heads"], op.attrs["q_len"],
            op.attrs["head_dim"]) == (2, 4, kv, 16, 16)
    _assert_bitwise(fn, q, k, v)


def _window_visible(t, left, right):
    return sum(min(i + right, t - 1) - max(i - left, 0) + 1 for i in range(t)) / t ** 2


@pytest.mark.parametrize("name", ["plain", "causal", "bias", "mask", "window", "decode", "bf16"])
def test_dot_product_attention_variants(name):
    q, k, v = _qkv(n=4, kv=2)
    rng = np.random.default_rng(6)
    cases = {
        "plain": (_dpa(), (q, k, v), {}),
        "causal": (_dpa(is_causal=True), (q, k, v), {"mask": "causal"}),
        "bias": (_dpa(), (q, k, v, _normal(7, (1, 4, 16, 16))), {"bias": True}),
        "mask": (lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla"),
                 (q, k, v, jnp.asarray(rng.random((2, 1, 16, 16)) < .5)), {"mask": "operand"}),
        "window": (_dpa(local_window_size=(3, 1)), (q, k, v),
                   {"mask": "constant", "visible": _window_visible(16, 3, 1)}),
        "decode": (lambda q, k, v, n: jax.nn.dot_product_attention(
                       q, k, v, key_value_seq_lengths=n, implementation="xla"),
                   (q[:, :1], k, v, jnp.array([5, 16], jnp.int32)), {"mask": "operand", "q_len": 1}),
        "bf16": (_dpa(is_causal=True), tuple(x.astype(jnp.bfloat16) for x in (q, k, v)),
                 {"mask": "causal", "dtype": "bfloat16"}),
    }
    fn, args, expected = cases[name]
    _, after = _modules(fn, *args)
    (op,) = _flash_ops(after)
    for key, value in expected.items():
        assert op.attrs[key] == pytest.approx(value) if key == "visible" else op.attrs[key] == value
    # every argument (q, k, v, bias / mask / lengths) is an operand of the one op
    assert set(after.params) <= set(op.operands)
    _assert_bitwise(fn, *args)


def test_long_constant_masks_are_evaluated_in_slabs():
    # a 4096 x 4096 mask is never built whole: evenly spaced slabs of rows are
    t = 4096
    s = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.bfloat16)
    causal_window = sum(min(i, 100) + 1 for i in range(t)) / t ** 2  # keys i-100 .. i
    for fn, mask, visible in [(quickstart.attention, "causal", (t + 1) / (2 * t)),
                              (_dpa(is_causal=True, local_window_size=(100, 3)), "constant",
                               causal_window)]:
        _, after = _modules(fn, s, s, s)
        (op,) = _flash_ops(after)
        assert op.attrs["mask"] == mask
        assert op.attrs["visible"] == pytest.approx(visible, rel=1e-3)


def test_attention_in_a_scan_body():
    def layers(x, ws):
        def layer(h, w):
            q = (h @ w).reshape(h.shape[0], h.shape[1], 2, -1)
            return h + quickstart.attention(q, q, q).reshape(h.shape), None
        return jax.lax.scan(layer, x, ws)[0]

    x, ws = _normal(8, (2, 8, 16)), _normal(9, (3, 16, 16)) / 4
    _, after = _modules(layers, x, ws)
    (scan,) = [op for op in after.ops if op.kind == "scan"]
    assert len(_flash_ops(scan.regions["body"])) == 1
    _assert_bitwise(layers, x, ws)


def test_the_primitive_gets_its_query_block_and_the_pass_is_idempotent():
    q, k, v = _qkv()
    _, after = _modules(lambda q, k, v: flash_attention(q, k, v, is_causal=True), q, k, v)
    (op,) = after.ops
    assert op.attrs["q_block"] == attention.query_block_rows(CHIP, 16, 16, 4)
    _, once = _modules(quickstart.attention, q, k, v)
    assert attention.run(once, CTX).as_text() == once.as_text()


# ------------------------------------------------------------ cost

def _without_attention_pass(fn, *structs, chip):
    lowered = mtia_jax.jit(fn, chip=chip).lower(*structs)
    passes = tuple(p for p in pipeline.PASSES if p is not attention)
    return program_cost(pipeline.run_passes(lowered.module, pipeline.PassContext(chip=lowered.chip),
                                            passes), lowered.chip)


@pytest.mark.parametrize("chip", ["mtia450", "mtia400"])
def test_modeled_hbm_bytes_drop(chip):
    b, t, n, h = 4, 256, 8, 64
    s = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    report = mtia_jax.estimate(quickstart.attention, s, s, s, chip=chip)
    without = _without_attention_pass(quickstart.attention, s, s, s, chip=chip)
    # q, k, v in and the output out; the (B, N, T, S) scores never reach HBM
    # (and 4 x 256 query rows fit one software query block on MTIA 400)
    assert report.hbm_bytes == 4 * b * t * n * h * 2
    assert without.total("hbm_bytes") > 5 * report.hbm_bytes
    assert report.time_s < without.time_s


def test_pattern_and_primitive_cost_the_same():
    b, t, n, kv, h = 2, 512, 8, 2, 64
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    for chip in ("mtia450", "mtia400"):
        pattern = mtia_jax.estimate(_dpa(is_causal=True), q, k, k, chip=chip)
        primitive = mtia_jax.estimate(lambda *a: flash_attention(*a, is_causal=True), q, k, k, chip=chip)
        (a,) = [x for x in pattern.cost.kernels if x.kind == "flash_attention"]
        (p,) = primitive.cost.kernels
        assert (a.flops, a.transcendentals, a.hbm_bytes, a.time_s) == pytest.approx(
            (p.flops, p.transcendentals, p.hbm_bytes, p.time_s))
        assert a.flops == pytest.approx(4 * b * n * t * t * h * (t + 1) / (2 * t))


# ------------------------------------------------------------ left alone

def _returns_probs_too(q, k, v):
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), probs


def _soft_capped(q, k, v):
    scores = 30.0 * jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 30.0)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _unbatched(q, k, v):  # plain matrices: no batch/head dimensions
    return jax.nn.softmax(q[0, :, 0] @ k[0, :, 0].T, axis=-1) @ v[0, :, 0]


def _grad_of_attention(q, k, v):
    return jax.grad(lambda q: jnp.sum(quickstart.attention(q, k, v) ** 2))(q)


@pytest.mark.parametrize("fn", [_returns_probs_too, _soft_capped, _unbatched, _grad_of_attention])
def test_programs_left_alone(fn):
    q, k, v = _qkv(t=8)
    before, after = _modules(fn, q, k, v)
    assert not _flash_ops(after)
    assert after.as_text() == before.as_text()
    _assert_bitwise(fn, q, k, v)


@pytest.mark.parametrize("fn, args", [
    (lambda: jax.lax.iota(jnp.int32, 5), ()),
    (lambda: jax.lax.broadcasted_iota(jnp.int32, (3, 4), 1), ()),
    (lambda x: jax.lax.broadcast_in_dim(x, (2, 3, 4), (0, 2)), (np.arange(8, dtype=np.int32).reshape(2, 4),)),
    (lambda x: jnp.broadcast_to(x, (3, 3)), (np.int32(7),)),
    (lambda x: x.reshape(3, 2), (np.arange(6, dtype=np.int32).reshape(2, 3),)),
    (lambda x: jax.lax.reshape(x, (2, 3), dimensions=(1, 0)), (np.arange(6, dtype=np.int32).reshape(3, 2),)),
    (lambda x: x.T, (np.arange(6, dtype=np.int32).reshape(2, 3),)),
    (lambda x: jax.lax.squeeze(x, (0, 2)), (np.arange(3, dtype=np.int32).reshape(1, 3, 1),)),
], ids=["iota", "broadcasted-iota", "broadcast", "broadcast-scalar", "reshape", "reshape-dims",
        "transpose", "squeeze"])
def test_mask_layout_ops_evaluate_in_numpy_as_xla_does(fn, args):
    (eqn,) = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    module = from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args))
    (op,) = [op for op in module.ops if op.kind == eqn.primitive.name]
    got = attention._apply(op, list(args))
    want = np.asarray(jax.jit(fn)(*args))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
