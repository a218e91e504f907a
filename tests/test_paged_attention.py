"""The paged_attention primitive (mtia_jax.primitives.paged_attention): numerics
against a NumPy loop and against flash_attention on the contiguous layout,
under mtia_jax.jit, input validation, its partitioning, and its modeled cost
(runtime.accelerated.attention) worked out by hand: the blocks the tables
name are read, not the pool."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mtia_jax
from lowering.passes.attention import query_block_rows
from mtia_jax.mx import MXType
from mtia_jax.primitives.flash_attention import flash_attention
from mtia_jax.primitives.paged_attention import paged_attention, paged_attention_reference
from kernels import flat_kinds

BS, W, K, HEADS, H = 4, 3, 2, 4, 16          # block size, table width, kv heads, heads, head dim
NUM_BLOCKS = 16
# sequence -> its tokens' positions this step: a prefill chunk of sequence 0
# (positions 6..9), decode tokens of sequences 1 and 2, a padding token
SEQ_IDS = np.array([0, 0, 0, 0, 1, 2, 0], np.int32)
POSITIONS = np.array([6, 7, 8, 9, 6, 2, 0], np.int32)
TABLES = np.array([[11, 2, 7],      # length 10: three blocks, scattered
                   [5, 14, -1],     # length 7: two blocks; an unused slot
                   [9, 0, 3]],      # length 3: one block used
                  np.int32)
ATOL32 = 1e-5


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _inputs(dtype=jnp.float32, seed=0, num_blocks=NUM_BLOCKS):
    rng = np.random.default_rng(seed)
    q = _normal(rng, (len(SEQ_IDS), HEADS, H), dtype)
    k_pool = _normal(rng, (num_blocks, BS, K, H), dtype)
    v_pool = _normal(rng, (num_blocks, BS, K, H), dtype)
    return q, k_pool, v_pool, jnp.asarray(TABLES), jnp.asarray(SEQ_IDS), jnp.asarray(POSITIONS)


def numpy_paged_attention(q, k_pool, v_pool, tables, seq_ids, positions, scale=None):
    """Token by token, head by head, in float64."""
    q, k_pool, v_pool = (np.asarray(x, np.float64) for x in (q, k_pool, v_pool))
    n, heads, h = q.shape
    bs, kv_heads = k_pool.shape[1], k_pool.shape[2]
    scale = 1 / math.sqrt(h) if scale is None else scale
    out = np.zeros_like(q)
    for i in range(n):
        s, p = int(seq_ids[i]), int(positions[i])
        rows = [(int(tables[s][j // bs]), j % bs) for j in range(p + 1)]
        keys = np.stack([k_pool[b, o] for b, o in rows])      # (p + 1, K, H)
        values = np.stack([v_pool[b, o] for b, o in rows])
        for head in range(heads):
            kv = head // (heads // kv_heads)
            logits = keys[:, kv] @ q[i, head] * scale
            probs = np.exp(logits - logits.max())
            out[i, head] = (probs / probs.sum()) @ values[:, kv]
    return out


def _close(got, want, atol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=0)


# ------------------------------------------------------------ numerics

@pytest.mark.parametrize("dtype, atol", [(jnp.float32, ATOL32), (jnp.bfloat16, 3e-2)])
def test_matches_a_numpy_loop_over_tokens(dtype, atol):
    args = _inputs(dtype)
    got = paged_attention(*args)
    assert got.shape == (len(SEQ_IDS), HEADS, H) and got.dtype == dtype
    _close(got, numpy_paged_attention(*args), atol)


def test_scale_is_passed_through():
    args = _inputs()
    _close(paged_attention(*args, scale=0.5), numpy_paged_attention(*args, scale=0.5), ATOL32)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, ATOL32), (jnp.bfloat16, 2e-2)])
def test_matches_flash_attention_on_the_contiguous_layout(dtype, atol):
    q, k_pool, v_pool, tables, seq_ids, positions = _inputs(dtype, seed=1)
    got = paged_attention(q, k_pool, v_pool, tables, seq_ids, positions)
    span = W * BS
    sequences = [np.flatnonzero(SEQ_IDS == s) for s in range(len(TABLES))]

    @jax.jit
    def contiguous(q, k_pool, v_pool):  # each sequence's keys in order, one flash_attention each
        outs = []
        for s, mine in enumerate(sequences):
            blocks = np.clip(TABLES[s], 0, None)
            keys = k_pool[blocks].reshape(1, span, K, H)
            values = v_pool[blocks].reshape(1, span, K, H)
            mask = (np.arange(span)[None, :] <= POSITIONS[mine][:, None])[None, None]
            outs.append(flash_attention(q[mine][None], keys, values, mask=jnp.asarray(mask))[0])
        return outs

    for mine, want in zip(sequences, contiguous(q, k_pool, v_pool)):
        _close(got[mine], want, atol)


def test_padding_and_garbage_blocks_never_make_nan():
    q, k_pool, v_pool, tables, _, _ = _inputs()
    used = {int(b) for s, p in ((0, 9), (1, 6), (2, 2)) for b in TABLES[s][:p // BS + 1]}
    unused = np.array([b for b in range(NUM_BLOCKS) if b not in used])
    k_pool = k_pool.at[unused].set(jnp.nan)
    v_pool = v_pool.at[unused].set(jnp.inf)
    # padding tokens of every sequence at position 0, and a real decode token
    seq_ids = jnp.array([0, 1, 2, 1, 2, 0, 1], jnp.int32)
    positions = jnp.array([0, 0, 0, 6, 2, 9, 5], jnp.int32)
    got = paged_attention(q, k_pool, v_pool, tables, seq_ids, positions)
    assert np.isfinite(np.asarray(got)).all()


def test_mtia_jit_is_one_op_equal_to_jax_jit():
    args = _inputs(jnp.bfloat16, seed=2)
    fn = lambda *a: paged_attention(*a)
    compiled = mtia_jax.jit(fn, chip="mtia450").lower(*args).compile()
    assert [op.kind for op in compiled.module.ops] == ["paged_attention"]
    got, want = mtia_jax.jit(fn, chip="mtia450")(*args), jax.jit(fn)(*args)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    cost = compiled.cost_analysis()
    assert cost["flops"] == 4 * len(SEQ_IDS) * HEADS * W * BS * H and cost["time_s"] > 0


def test_jax_jit_and_grad_smoke():
    q, *rest = _inputs()
    out = jax.jit(paged_attention)(q, *rest)
    _close(out, paged_attention(q, *rest), 0)
    g = jax.jit(jax.grad(lambda q: jnp.sum(paged_attention(q, *rest) ** 2)))(q)
    assert g.shape == q.shape and np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------ validation

def _with(index, value):
    def make(args):
        args = list(args)
        args[index] = value(args[index])
        return paged_attention(*args)
    return make


@pytest.mark.parametrize("make, message", [
    (_with(0, lambda q: q[0]), r"q has shape \(4, 16\); expected rank 3 \(N, heads, H\)"),
    (_with(0, lambda q: q.astype(jnp.int32)), r"q must be a floating-point array"),
    (_with(1, lambda k: k[0]), r"k_pool has shape \(4, 2, 16\); expected rank 4"),
    (_with(1, lambda k: k[..., :8]), r"k_pool has shape .* head dim H = 16"),
    (_with(2, lambda v: v[:, :2]), r"v_pool has shape \(16, 2, 2, 16\); expected the shape of k_pool"),
    (_with(0, lambda q: q[:, :3]), r"q has 3 heads .* not a multiple of the pool's 2 kv_heads"),
    (_with(1, lambda k: k.astype(jnp.bfloat16)), r"one dtype"),
    (_with(3, lambda t: t.astype(jnp.float32)), r"block_tables has dtype float32; expected an int32"),
    (_with(3, lambda t: t[0]), r"block_tables has shape \(3,\); expected \(B, W\)"),
    (_with(4, lambda s: s[:3]), r"seq_ids has shape \(3,\); expected \(N,\) = \(7,\)"),
    (_with(5, lambda p: p.astype(jnp.float32)), r"positions has dtype float32; expected an int32"),
    (lambda args: paged_attention(*args, scale="big"), r"scale is 'big'"),
])
def test_errors_name_the_argument(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make(_inputs())


# ------------------------------------------------------------ partitioning

MESH = mtia_jax.make_mesh((2, 2), ("data", "model"))


def _ns(*spec):
    return NamedSharding(MESH, P(*spec))


def test_tokens_and_heads_stay_split_with_no_communication():
    args = _inputs(seed=3)[:3] + _inputs()[3:]
    args = (args[0][:6],) + args[1:4] + (args[4][:6], args[5][:6])   # 6 tokens: split in 2
    fn = lambda *a: paged_attention(*a)
    pool = _ns(None, None, "model")
    g = mtia_jax.jit(fn, in_shardings=(_ns("data", "model"), pool, pool, _ns(), _ns("data"),
                                       _ns("data")))
    _close(g(*args), jax.jit(fn)(*args), 1e-6)
    compiled = g.lower(*args).compile()
    assert [k for k in flat_kinds(compiled.module.ops) if k != "constant"] == ["paged_attention"]
    (op,) = [o for o in compiled.module.ops if o.kind == "paged_attention"]
    assert op.operands[0].type.shape == (3, 2, H) and op.operands[1].type.shape == (NUM_BLOCKS, BS, 1, H)


def test_pools_split_by_kv_heads_keep_their_split_when_q_is_whole():
    args = _inputs(seed=5)
    fn = lambda *a: paged_attention(*a)
    pool = _ns(None, None, "model")
    g = mtia_jax.jit(fn, in_shardings=(_ns(), pool, pool, _ns(), _ns(), _ns()))
    _close(g(*args), jax.jit(fn)(*args), 1e-6)
    (op,) = [o for o in g.lower(*args).compile().module.ops if o.kind == "paged_attention"]
    assert op.operands[0].type.shape == (len(SEQ_IDS), 2, H)        # q sliced locally
    assert op.operands[1].type.shape == (NUM_BLOCKS, BS, 1, H)      # the pool not gathered


def test_a_pool_split_by_blocks_is_gathered():
    args = _inputs(seed=4)
    fn = lambda *a: paged_attention(*a)
    g = mtia_jax.jit(fn, in_shardings=(_ns(), _ns("data"), _ns("data"), _ns(), _ns(), _ns()))
    _close(g(*args), jax.jit(fn)(*args), 1e-6)
    ops = g.lower(*args).compile().module.ops
    assert "all_gather" in flat_kinds(ops)
    (op,) = [o for o in ops if o.kind == "paged_attention"]
    assert op.operands[1].type.shape == op.operands[2].type.shape == (NUM_BLOCKS, BS, K, H)


# ------------------------------------------------------------ cost by hand

N, B, WIDTH, BLOCK, KV, NH, HD = 6, 3, 4, 16, 2, 4, 32


def _structs(num_blocks, dtype=jnp.bfloat16, n=N, heads=NH, kv=KV, batch=B):
    s = jax.ShapeDtypeStruct
    return (s((n, heads, HD), dtype), s((num_blocks, BLOCK, kv, HD), dtype),
            s((num_blocks, BLOCK, kv, HD), dtype), s((batch, WIDTH), jnp.int32),
            s((n,), jnp.int32), s((n,), jnp.int32))


def _kernel(structs, chip="mtia450", precision=None):
    report = mtia_jax.estimate(lambda *a: paged_attention(*a), *structs, chip=chip,
                               precision=precision)
    (kernel,) = [k for k in report.cost.kernels if k.kind == "paged_attention"]
    return kernel


def _io_bytes(kv_bytes, n=N, heads=NH, batch=B):
    q = out = n * heads * HD * 2
    return q + 2 * kv_bytes + batch * WIDTH * 4 + 2 * n * 4 + out


def test_cost_charges_the_blocks_the_tables_name_not_the_pool():
    kv_bytes = B * WIDTH * BLOCK * KV * HD * 2        # each sequence's table, read once
    small, large = _kernel(_structs(16)), _kernel(_structs(128))
    assert 16 * BLOCK * KV * HD * 2 > kv_bytes       # the pool is bigger than what is read
    for kernel in (small, large):
        assert kernel.bytes_accessed == _io_bytes(kv_bytes)
        assert kernel.hbm_bytes == _io_bytes(kv_bytes)  # MTIA 450: the unit re-reads nothing
        assert kernel.flops == 4 * N * NH * WIDTH * BLOCK * HD
        assert kernel.transcendentals == N * NH * WIDTH * BLOCK
    assert large.time_s == small.time_s


def test_cost_never_reads_more_than_the_pool():
    pool = 4 * BLOCK * KV * HD * 2                    # 4 blocks < the 12 the tables name
    assert _kernel(_structs(4)).bytes_accessed == _io_bytes(pool)


def test_the_floor_counts_the_blocks_read():
    report = mtia_jax.estimate(lambda *a: paged_attention(*a), *_structs(1024), chip="mtia450")
    kernel = _kernel(_structs(1024))
    chip = mtia_jax.chips.get("mtia450")
    assert report.roofline_time_s <= kernel.bytes_accessed / chip.hbm_bandwidth * 1.0001
    assert report.time_s >= report.roofline_time_s


def test_kv_cache_policy_reads_the_blocks_packed():
    policy = mtia_jax.PrecisionPolicy(kv_cache="mx8")
    kernel = _kernel(_structs(128), precision=policy)
    elements = B * WIDTH * BLOCK * KV * HD
    packed = MXType("mx8").nbytes((B * WIDTH * BLOCK, KV, HD), -1)
    assert packed == elements + elements // 32        # 8 bits + one 8-bit scale per 32
    assert kernel.bytes_accessed == _io_bytes(packed)


def test_kv_cache_policy_numerics():
    args = _inputs(seed=5)
    policy = mtia_jax.PrecisionPolicy(kv_cache="mx8")
    compiled = mtia_jax.jit(lambda *a: paged_attention(*a), chip="mtia450", precision=policy)
    (op,) = [o for o in compiled.lower(*args).compile().module.ops if o.kind == "paged_attention"]
    assert op.params["kv_format"] == "mxfp8_e4m3"
    want = jax.jit(lambda *a: paged_attention_reference(*a, scale=1 / math.sqrt(H),
                                                        kv_format="mxfp8_e4m3"))(*args)
    np.testing.assert_array_equal(np.asarray(compiled(*args)), np.asarray(want))
    assert np.abs(np.asarray(want) - np.asarray(paged_attention(*args))).max() > 1e-3


def test_without_the_unit_a_long_prefill_rereads_its_blocks():
    chip = mtia_jax.chips.get("mtia400")
    assert "flash_attention" not in chip.units
    n, heads, kv = 512, 4, 1                          # one sequence's 512-token chunk
    kernel = _kernel(_structs(64, n=n, heads=heads, kv=kv, batch=1), chip=chip)
    kv_bytes = 1 * WIDTH * BLOCK * kv * HD * 2
    rows = (heads // kv) * n                          # query rows per KV head of the sequence
    passes = math.ceil(rows / query_block_rows(chip, HD, HD, 2))
    assert passes > 1
    io = _io_bytes(kv_bytes, n=n, heads=heads, batch=1)
    assert kernel.bytes_accessed == io
    assert kernel.hbm_bytes == io + 2 * kv_bytes * (passes - 1)
    on_450 = _kernel(_structs(64, n=n, heads=heads, kv=kv, batch=1))
    assert on_450.hbm_bytes == io
