"""The flash_attention primitive: numerics against jax.nn.dot_product_attention,
its rules (grad, vmap keeps the primitive, jit), input validation, and its
modeled cost worked out by hand on MTIA 450 (FlashAttention unit) and MTIA 400."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import mtia_jax
from mtia_jax.primitives.flash_attention import flash_attention

ATOL32, RTOL32 = 2e-6, 2e-6
ATOL16, RTOL16 = 2e-2, 2e-2


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _jax(*args, **kwargs):
    return jax.nn.dot_product_attention(*args, implementation="xla", **kwargs)


def _close(got, want, atol=ATOL32, rtol=RTOL32):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=rtol)


# ------------------------------------------------------------ numerics

@st.composite
def attention_cases(draw, bf16=False):
    b, t, s = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k = draw(st.sampled_from([1, 2]))
    n = k * draw(st.sampled_from([1, 2, 3]))
    # 16-bit cases keep two non-trivial dims of (rows, keys, head dim): XLA's
    # CPU backend rejects jax's explicit dot algorithm on a degenerate dot
    # under jit (see test_degenerate_16bit_shapes)
    h = draw(st.sampled_from([4, 8] if bf16 else [1, 4, 8]))
    s = max(s, 2) if bf16 else s
    kwargs = {"is_causal": draw(st.booleans())}
    if draw(st.booleans()):
        kwargs["local_window_size"] = draw(st.one_of(
            st.integers(0, 4), st.tuples(st.integers(0, 4), st.integers(0, 4))))
    if draw(st.booleans()):
        kwargs["key_value_seq_lengths"] = draw(st.lists(st.integers(0, s), min_size=b, max_size=b))
    if draw(st.booleans()):
        kwargs["query_seq_lengths"] = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    full = (b, n, t, s)
    # broadcast shapes: each of the 4 dims 1 or full, possibly fewer leading dims
    bias = draw(st.none() | st.tuples(*[st.sampled_from([1, d]) for d in full]))
    mask = draw(st.none() | st.tuples(*[st.sampled_from([1, d]) for d in full]))
    drop = draw(st.integers(0, 2))
    if mask is not None and all(d == 1 for d in mask[:drop]):
        mask = mask[drop:]
    return (b, t, s, n, k, h), bias, mask, kwargs, draw(st.integers(0, 2**31 - 1))


def _inputs(case, dtype=jnp.float32):
    (b, t, s, n, k, h), bias_shape, mask_shape, kwargs, seed = case
    rng = np.random.default_rng(seed)
    q, key, v = _normal(rng, (b, t, n, h), dtype), _normal(rng, (b, s, k, h), dtype), \
        _normal(rng, (b, s, k, h), dtype)
    bias = None if bias_shape is None else _normal(rng, bias_shape)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.6)
    kwargs = {name: (jnp.asarray(val, jnp.int32) if name.endswith("lengths") else val)
              for name, val in kwargs.items()}
    return (q, key, v, bias, mask), kwargs


def _both_jitted(args, kwargs):
    """(flash_attention, jax.nn.dot_product_attention) of one case, each one
    compiled program (arrays as arguments, the rest static)."""
    arrays = {k: v for k, v in kwargs.items() if k.endswith("lengths")}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    run = lambda fn: jax.jit(lambda a, kw: fn(*a, **kw, **static))(args, arrays)
    return run(flash_attention), run(_jax)


@settings(max_examples=15, deadline=None)
@given(case=attention_cases())
def test_matches_dot_product_attention_fp32(case):
    _close(*_both_jitted(*_inputs(case)))


@settings(max_examples=6, deadline=None)
@given(case=attention_cases(bf16=True))
def test_matches_dot_product_attention_bf16(case):
    _close(*_both_jitted(*_inputs(case, jnp.bfloat16)), ATOL16, RTOL16)


@pytest.mark.parametrize("t, s, h", [(1, 1, 4), (1, 5, 1), (3, 1, 1)])
def test_degenerate_16bit_shapes(t, s, h):
    # jax falls back to the default dot precision when its dot algorithm does
    # not compile (eagerly only); the primitive compiles under jit as well
    rng = np.random.default_rng(7)
    q, k = _normal(rng, (1, t, 1, h), jnp.bfloat16), _normal(rng, (1, s, 1, h), jnp.bfloat16)
    _close(jax.jit(flash_attention)(q, k, k), _jax(q, k, k), ATOL16, RTOL16)


def test_fully_masked_rows_attend_uniformly_as_jax_does():
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, (2, 4, 2, 8)), _normal(rng, (2, 6, 2, 8)), _normal(rng, (2, 6, 2, 8))
    mask = np.ones((2, 1, 4, 6), bool)
    mask[0, :, 1] = False                       # one query row sees no key
    lengths = jnp.array([0, 3], jnp.int32)       # sequence 0: an empty KV cache
    for kwargs in ({"mask": jnp.asarray(mask)}, {"key_value_seq_lengths": lengths},
                   {"local_window_size": (0, 0), "is_causal": True}):
        got, want = _both_jitted((q, k, v), kwargs)
        _close(got, want)
        assert np.isfinite(np.asarray(got)).all()
    got = jax.jit(flash_attention)(q, k, v, mask=jnp.asarray(mask))
    # the fully masked row is the mean of the values over all keys
    _close(got[0, 1], jnp.mean(v[0], axis=0), atol=1e-6, rtol=1e-5)


def test_decode_against_kv_cache_gqa():
    rng = np.random.default_rng(2)
    b, s, n, kv, h = 3, 16, 8, 2, 16
    q = _normal(rng, (b, 1, n, h), jnp.bfloat16)
    cache_k, cache_v = _normal(rng, (b, s, kv, h), jnp.bfloat16), _normal(rng, (b, s, kv, h), jnp.bfloat16)
    lengths = jnp.array([1, 9, 16], jnp.int32)
    got = jax.jit(lambda *a: flash_attention(*a[:3], key_value_seq_lengths=a[3]))(
        q, cache_k, cache_v, lengths)
    _close(got, _jax(q, cache_k, cache_v, key_value_seq_lengths=lengths), ATOL16, RTOL16)
    # an independent reference: each sequence attends to its first `length` keys only
    for i, length in enumerate(np.asarray(lengths)):
        kk = np.repeat(np.asarray(cache_k[i, :length], np.float32), n // kv, axis=1)
        vv = np.repeat(np.asarray(cache_v[i, :length], np.float32), n // kv, axis=1)
        logits = np.einsum("nh,snh->ns", np.asarray(q[i, 0], np.float32), kk) / np.sqrt(h)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("ns,snh->nh", p / p.sum(-1, keepdims=True), vv)
        np.testing.assert_allclose(np.asarray(got[i, 0], np.float32), want, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------ rules

def test_grad_matches_check_grads():
    rng = np.random.default_rng(3)
    q, k, v = _normal(rng, (1, 3, 2, 4)), _normal(rng, (1, 5, 1, 4)), _normal(rng, (1, 5, 1, 4))
    bias = _normal(rng, (1, 2, 3, 5))
    f = lambda q, k, v, bias: flash_attention(q, k, v, bias, is_causal=True,
                                              key_value_seq_lengths=jnp.array([4], jnp.int32))
    f = jax.jit(f)
    check_grads(f, (q, k, v, bias), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    ref = lambda q, k, v, bias: _jax(q, k, v, bias, is_causal=True,
                                     key_value_seq_lengths=jnp.array([4], jnp.int32))
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g, w in zip(got, want):
        _close(g, w, atol=1e-5, rtol=1e-5)


def _primitive_names(jaxpr) -> list[str]:
    return [e.primitive.name for e in jaxpr.jaxpr.eqns]


@pytest.mark.parametrize("mapped", ["qkv", "q_only", "bias_and_lengths"])
def test_vmap_keeps_the_primitive(mapped):
    rng = np.random.default_rng(4)
    v_size, b, t, s, n, kv, h = 3, 2, 4, 5, 4, 2, 8
    q = _normal(rng, (v_size, b, t, n, h))
    k, v = _normal(rng, (v_size, b, s, kv, h)), _normal(rng, (v_size, b, s, kv, h))
    bias = _normal(rng, (v_size, 1, n, t, s))
    lengths = jnp.asarray(rng.integers(1, s + 1, (v_size, b)), jnp.int32)
    if mapped == "qkv":
        fn = lambda q, k, v: flash_attention(q, k, v, is_causal=True)
        in_axes, args = (0, 0, 0), (q, k, v)
    elif mapped == "q_only":
        fn = lambda q, k, v: flash_attention(q, k, v, local_window_size=1)
        in_axes, args = (0, None, None), (q, k[0], v[0])
    else:
        fn = lambda q, k, v, bias, n_kv: flash_attention(q, k, v, bias, key_value_seq_lengths=n_kv)
        in_axes, args = (None, None, None, 0, 0), (q[0], k[0], v[0], bias, lengths)
    batched = jax.vmap(fn, in_axes=in_axes)
    assert "flash_attention" in _primitive_names(jax.make_jaxpr(batched)(*args))
    got = batched(*args)
    for i in range(v_size):
        one = [a if ax is None else a[i] for a, ax in zip(args, in_axes)]
        _close(got[i], fn(*one))


def test_vmap_moves_a_non_leading_batch_axis():
    rng = np.random.default_rng(5)
    q = _normal(rng, (2, 3, 4, 2, 8))   # vmapped axis 1
    k = _normal(rng, (2, 5, 2, 8))
    fn = lambda q: flash_attention(q, k, k)
    got = jax.vmap(fn, in_axes=1)(q)
    for i in range(3):
        _close(got[i], fn(q[:, i]))


def test_mtia_jit_imports_one_op_and_matches_jax_jit_bit_for_bit():
    rng = np.random.default_rng(6)
    q, k = _normal(rng, (2, 8, 4, 16), jnp.bfloat16), _normal(rng, (2, 8, 2, 16), jnp.bfloat16)
    mask = jnp.asarray(rng.random((2, 1, 8, 8)) < 0.5)
    fn = lambda q, k, v, mask: flash_attention(q, k, v, mask=mask, is_causal=True)
    lowered = mtia_jax.jit(fn).lower(q, k, k, mask)
    assert [op.kind for op in lowered.module.ops] == ["flash_attention"]
    op = lowered.module.ops[0]
    assert op.params["optional_operands"] == ("mask",) and len(op.operands) == 4
    got, want = mtia_jax.jit(fn)(q, k, k, mask), jax.jit(fn)(q, k, k, mask)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


# ------------------------------------------------------------ validation

@pytest.mark.parametrize("make, message", [
    (lambda q, k: flash_attention(q[0], k, k), r"query has shape \(8, 4, 16\); expected rank 4"),
    (lambda q, k: flash_attention(q, k[..., :8], k[..., :8]), r"key has shape .* head dim H = 16"),
    (lambda q, k: flash_attention(q[:, :, :3], k, k), r"3 heads .* not a multiple of the 2"),
    (lambda q, k: flash_attention(q, k, k[:, :4]), r"value has shape \(2, 4, 2, 16\); expected the shape of key"),
    (lambda q, k: flash_attention(q, k, k, key_value_seq_lengths=jnp.ones((3,), jnp.int32)),
     r"key_value_seq_lengths has shape \(3,\); expected \(B,\) = \(2,\)"),
    (lambda q, k: flash_attention(q, k, k, query_seq_lengths=jnp.ones((2,))),
     r"query_seq_lengths has dtype float32; expected int32"),
    (lambda q, k: flash_attention(q, k, k, mask=jnp.ones((2, 4, 8, 3), bool)),
     r"mask has shape \(2, 4, 8, 3\); expected each dimension 1 or the full size of \(B, N, T, S\)"),
    (lambda q, k: flash_attention(q, k, k, mask=jnp.ones((1, 1, 8, 8))), r"mask has dtype float32; expected bool"),
    (lambda q, k: flash_attention(q, k, k, bias=jnp.ones((1, 1, 1, 8, 8))), r"bias has shape .* at most 4"),
    (lambda q, k: flash_attention(q, k, k, bias=jnp.ones((3, 8))), r"bias has shape \(1, 1, 3, 8\)"),
    (lambda q, k: flash_attention(q, k, k, local_window_size=(1, 2, 3)), r"local_window_size is \(1, 2, 3\)"),
    (lambda q, k: flash_attention(q, k.astype(jnp.bfloat16), k), r"one dtype"),
])
def test_errors_name_the_argument_and_expected_shape(make, message):
    q, k = jnp.ones((2, 8, 4, 16)), jnp.ones((2, 8, 2, 16))
    with pytest.raises((ValueError, TypeError), match=message):
        make(q, k)


# ------------------------------------------------------------ cost by hand

def _kernel(fn, *structs, chip):
    report = mtia_jax.estimate(fn, *structs, chip=chip)
    (kernel,) = [k for k in report.cost.kernels if k.kind == "flash_attention"]
    return kernel


def _hand_q_block(chip, h, itemsize):
    # Q tile + fp32 accumulator + running max/sum + a 32-wide fp32 score row
    # per query row, next to double-buffered 32-row K and V tiles, in one PE
    per_row = h * itemsize + h * 4 + 8 + 32 * 4
    rows = (chip.pe_local_bytes - 2 * 32 * 2 * h * itemsize) // per_row
    return rows // 32 * 32


@pytest.mark.parametrize("chip_name", ["mtia450", "mtia400"])
def test_prefill_cost_by_hand(chip_name):
    chip = mtia_jax.chips.get(chip_name)
    b, t, n, kv, h = 1, 4096, 32, 8, 128
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
    kernel = _kernel(lambda q, k, v: flash_attention(q, k, v, is_causal=True), q, k, k, chip=chip)

    visible = (t * (t + 1) / 2) / (t * t)            # causal: query i sees i + 1 keys
    scores = b * n * t * t * visible
    assert kernel.flops == pytest.approx(4 * b * n * t * t * h * visible)
    assert kernel.transcendentals == pytest.approx(scores)
    io_bytes = 2 * (2 * b * t * n * h + 2 * b * t * kv * h)   # q, out; k, v (bf16)
    assert kernel.bytes_accessed == io_bytes
    matrix_s = kernel.flops / chip.peak_flops["bf16"]
    if "flash_attention" in chip.units:          # MTIA 450: exps in the unit, K/V read once
        assert _hand_q_block(chip, h, 2) == 384
        assert kernel.hbm_bytes == io_bytes
        assert kernel.compute_s == pytest.approx(matrix_s)
    else:                                        # MTIA 400: exps on the vector units, K/V re-read
        q_block = _hand_q_block(chip, h, 2)
        assert q_block == 384                    # (393216 - 32768) // 904 = 398 -> 384
        passes = math.ceil((n // kv) * t / q_block) * visible   # 43 query blocks, causal
        kv_bytes = 2 * b * t * kv * h * 2
        assert kernel.hbm_bytes == pytest.approx(io_bytes + kv_bytes * (passes - 1))
        vector_s = scores / chip.vector_flops["bf16"]
        assert kernel.compute_s == pytest.approx(max(matrix_s, vector_s))
    assert kernel.hbm_s == pytest.approx(kernel.hbm_bytes / chip.hbm_bandwidth)
    assert kernel.time_s == pytest.approx(max(kernel.compute_s, kernel.hbm_s) + chip.kernel_launch_s)


@pytest.mark.parametrize("chip_name", ["mtia450", "mtia400"])
def test_decode_cost_by_hand(chip_name):
    chip = mtia_jax.chips.get(chip_name)
    b, s, n, kv, h = 8, 4096, 32, 8, 128
    q = jax.ShapeDtypeStruct((b, 1, n, h), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((b, s, kv, h), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    kernel = _kernel(lambda q, k, v, n_kv: flash_attention(q, k, v, key_value_seq_lengths=n_kv),
                     q, cache, cache, lengths, chip=chip)
    # lengths are runtime values: the whole cache capacity is charged
    assert kernel.flops == 4 * b * n * 1 * s * h
    assert kernel.transcendentals == b * n * s
    io_bytes = 2 * (2 * b * n * h) + 2 * (2 * b * s * kv * h) + 4 * b
    # 4 query rows per KV head fit one query block: K/V are read once either way
    assert kernel.hbm_bytes == io_bytes
    matrix_s = kernel.flops / chip.peak_flops["bf16"]
    vector_s = 0.0 if "flash_attention" in chip.units else b * n * s / chip.vector_flops["bf16"]
    assert kernel.compute_s == pytest.approx(max(matrix_s, vector_s))
    assert kernel.bound == "memory"


def test_local_window_counts_only_the_visible_scores():
    t, h = 64, 16
    q = jax.ShapeDtypeStruct((1, t, 2, h), jnp.float32)
    kernel = _kernel(lambda q, k, v: flash_attention(q, k, v, local_window_size=(3, 2)),
                     q, q, q, chip="mtia450")
    visible = sum(min(i + 2, t - 1) - max(i - 3, 0) + 1 for i in range(t))
    assert kernel.transcendentals == 2 * visible
    assert kernel.flops == 4 * 2 * visible * h
