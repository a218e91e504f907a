"""The paged KV cache (models/paged_kv.py): the block allocator under random
allocate/free sequences (no leak, no double free, no block owned twice, no
more blocks than a sequence needs), paged attention against contiguous
attention, and how many sequences of a mixed-length workload fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import mtia_jax
from models.paged_kv import BlockAllocator, OutOfBlocks, concurrent_sequences, paged_attention

OPS = st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(0, 90)),
               max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 24), st.sampled_from([1, 4, 16]))
# a sequence holding zero positions stays registered when a later growth is refused
@example(ops=[("grow", 0, 0), ("grow", 0, 2)], num_blocks=1, block_size=1)
def test_allocator_never_leaks_nor_shares_a_block(ops, num_blocks, block_size):
    alloc = BlockAllocator(num_blocks, block_size)
    lengths: dict[int, int] = {}
    for op, seq, positions in ops:
        if op == "free":
            if seq in lengths:
                alloc.free(seq)
                del lengths[seq]
            else:
                with pytest.raises(KeyError, match="holds no blocks"):
                    alloc.free(seq)
            continue
        want = max(positions, lengths.get(seq, 0))
        before = alloc.free_blocks
        if alloc.can_allocate(seq, want):
            table = alloc.allocate(seq, want)
            lengths[seq] = want
            assert len(table) == -(-want // block_size)  # exactly the blocks it needs
        else:
            with pytest.raises(OutOfBlocks):
                alloc.allocate(seq, want)
            assert alloc.free_blocks == before  # a refused allocation takes nothing
        owned = [b for s in alloc.sequences for b in alloc.block_table(s)]
        assert len(owned) == len(set(owned))                      # no block owned twice
        assert len(owned) + alloc.free_blocks == num_blocks       # none leaked
        assert all(0 <= b < num_blocks for b in owned)
    for seq in list(lengths):
        alloc.free(seq)
    assert alloc.free_blocks == num_blocks and not alloc.sequences


def _pool_and_contiguous(key, lengths, block_size=4, kv_heads=2, head=8, blocks=16):
    """A pool holding each sequence's keys/values in scattered blocks, and the
    same keys/values contiguously (B, S, K, H)."""
    alloc = BlockAllocator(blocks, block_size)
    k1, k2 = jax.random.split(key)
    longest = max(lengths)
    k_seq = jax.random.normal(k1, (len(lengths), longest, kv_heads, head))
    v_seq = jax.random.normal(k2, (len(lengths), longest, kv_heads, head))
    # interleave the allocations so that no sequence's blocks are contiguous
    for step in range(1, longest + 1):
        for b, n in enumerate(lengths):
            if step <= n:
                alloc.allocate(b, step)
    k_pool = np.zeros((blocks, block_size, kv_heads, head), np.float32)
    v_pool = np.zeros_like(k_pool)
    for b, n in enumerate(lengths):
        for pos in range(n):
            block = alloc.block_table(b)[pos // block_size]
            k_pool[block, pos % block_size] = k_seq[b, pos]
            v_pool[block, pos % block_size] = v_seq[b, pos]
    return alloc, jnp.asarray(k_pool), jnp.asarray(v_pool), k_seq, v_seq


@pytest.mark.parametrize("t", [1, 3])
def test_paged_attention_equals_contiguous_attention(t):
    lengths = [9, 14, 5]
    alloc, k_pool, v_pool, k_seq, v_seq = _pool_and_contiguous(jax.random.PRNGKey(0), lengths)
    assert alloc.block_table(1) != list(range(alloc.block_table(1)[0], alloc.block_table(1)[0] + 4))
    q = jax.random.normal(jax.random.PRNGKey(1), (3, t, 4, 8))
    tables = alloc.padded_tables(range(3))
    lens = jnp.asarray(lengths)
    got = paged_attention(q, k_pool, v_pool, tables, lens)
    for b, n in enumerate(lengths):  # each sequence alone, contiguous, by plain jnp
        scores = jnp.einsum("tnh,snh->nts", q[b], jnp.repeat(k_seq[b, :n], 2, axis=1)) / np.sqrt(8)
        visible = jnp.arange(n)[None, :] <= (n - t + jnp.arange(t))[:, None]
        probs = jax.nn.softmax(jnp.where(visible[None], scores, -jnp.inf), axis=-1)
        want = jnp.einsum("nts,snh->tnh", probs, jnp.repeat(v_seq[b, :n], 2, axis=1))
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
    # compiled for MTIA: the same numbers as jax.jit
    np.testing.assert_allclose(mtia_jax.jit(paged_attention)(q, k_pool, v_pool, tables, lens),
                               jax.jit(paged_attention)(q, k_pool, v_pool, tables, lens), rtol=1e-6, atol=1e-6)


def test_a_mixed_length_workload_fits_at_least_twice_the_sequences_of_fixed_slots():
    """An engine serving up to 8k positions per sequence; prompts uniform in
    64..2048 tokens and outputs in 16..1024 (mean 1,576 positions): the
    fixed-slot cache reserves 8k per sequence, the paged one what each holds
    (ratio about 8192 / 1576; the paged count is the exact one)."""
    rng = np.random.default_rng(0)
    max_len = 8192
    lengths = rng.integers(64, 2049, size=1024) + rng.integers(16, 1025, size=1024)
    fixed, paged = concurrent_sequences(lengths, budget_positions=64 * max_len, max_len=max_len)
    assert fixed == 64
    # by hand: the paged cache holds sequences while their blocks fit the same positions
    blocks, count = 64 * max_len // 16, 0
    for n in lengths:
        if -(-int(n) // 16) > blocks:
            break
        blocks -= -(-int(n) // 16)
        count += 1
    assert paged == count and paged >= 2 * fixed


def test_bad_allocator_use_is_a_clear_error():
    with pytest.raises(ValueError, match="num_blocks and block_size"):
        BlockAllocator(0)
    alloc = BlockAllocator(2, 4)
    with pytest.raises(OutOfBlocks, match="needs 3 more blocks of 4 positions; 2 of 2 are free"):
        alloc.allocate("a", 12)
    assert alloc.sequences == () and alloc.free_blocks == 2
