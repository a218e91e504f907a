"""The paged KV cache (models/paged_kv.py): the block allocator under random
allocate/free/share sequences (no leak, no double free, reference counts
equal to the tables holding a block, no more blocks than a sequence needs),
prefix caching and eviction, paged attention through allocator-built tables
against contiguous attention, and how many sequences of a mixed-length
workload fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import mtia_jax
from models.paged_kv import BlockAllocator, OutOfBlocks, block_hashes, concurrent_sequences
from mtia_jax.primitives import flash_attention, paged_attention

# (op, sequence, positions or the sequence whose prefix to share)
OPS = st.lists(st.tuples(st.sampled_from(["grow", "free", "share", "cache"]), st.integers(0, 5),
                         st.integers(0, 90)), max_size=60)


def _check_invariants(alloc: BlockAllocator, lengths: dict, num_blocks: int, block_size: int):
    held: dict[int, int] = {}
    for seq in alloc.sequences:
        table = alloc.block_table(seq)
        assert len(table) == len(set(table))                      # no block twice in one table
        assert len(table) == -(-lengths[seq] // block_size)       # exactly the blocks it needs
        for b in table:
            held[b] = held.get(b, 0) + 1
    assert all(alloc.refs(b) == n for b, n in held.items())       # counts = tables holding it
    assert len(held) + alloc.free_blocks == num_blocks            # none leaked
    assert all(0 <= b < num_blocks for b in held)
    # fragmentation: a sequence wastes less than one block
    assert sum(len(alloc.block_table(s)) * block_size - lengths[s] for s in alloc.sequences) \
        < block_size * max(len(alloc.sequences), 1)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 24), st.sampled_from([1, 4, 16]))
# a sequence holding zero positions stays registered when a later growth is refused
@example(ops=[("grow", 0, 0), ("grow", 0, 2)], num_blocks=1, block_size=1)
def test_allocator_never_leaks_nor_double_counts_a_block(ops, num_blocks, block_size):
    alloc = BlockAllocator(num_blocks, block_size)
    lengths: dict[int, int] = {}
    tokens = {s: [(7 * s + i) % 3 for i in range(90)] for s in range(6)}  # few distinct prefixes
    for op, seq, arg in ops:
        if op == "free":
            if seq in lengths:
                alloc.free(seq)
                del lengths[seq]
            else:
                with pytest.raises(KeyError, match="holds no blocks"):
                    alloc.free(seq)
        elif op == "cache":  # mark the sequence's full blocks as computed
            if seq in lengths:
                hashes = block_hashes(tokens[seq][:lengths[seq]], block_size)
                for i, h in enumerate(hashes):
                    alloc.cache_block(seq, i, h)
        else:
            want = max(arg, lengths.get(seq, 0))
            prefix = block_hashes(tokens[seq], block_size) if op == "share" else ()
            before = alloc.free_blocks
            if alloc.can_allocate(seq, want, prefix):
                attached = alloc.allocate(seq, want, prefix)
                assert attached <= len(prefix)
                lengths[seq] = want
            else:
                with pytest.raises(OutOfBlocks):
                    alloc.allocate(seq, want, prefix)
                assert alloc.free_blocks == before  # a refused allocation takes nothing
        _check_invariants(alloc, lengths, num_blocks, block_size)
    for seq in list(lengths):
        alloc.free(seq)
    assert alloc.free_blocks == num_blocks and not alloc.sequences


def test_prefix_blocks_are_shared_cached_after_free_and_evicted_last():
    alloc = BlockAllocator(4, 2)
    a = [1, 2, 3, 4, 5]
    hashes = block_hashes(a, 2)
    assert len(hashes) == 2 and block_hashes([1, 2, 9, 9], 2)[0] == hashes[0] != block_hashes([1, 2, 9, 9], 2)[1]
    assert alloc.allocate("a", 5, hashes) == 0          # nothing cached yet: 3 new blocks
    for i, h in enumerate(hashes):
        alloc.cache_block("a", i, h)
    assert alloc.allocate("b", 5, hashes) == 2          # shares a's two full blocks, adds one
    assert alloc.block_table("b")[:2] == alloc.block_table("a")[:2]
    assert [alloc.refs(x) for x in alloc.block_table("a")] == [2, 2, 1] and alloc.free_blocks == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate("c", 2)
    alloc.free("a")
    alloc.free("b")
    assert alloc.free_blocks == 4 and alloc.cached_blocks == 2
    # a new sequence takes the uncached blocks first, and finds the prefix still cached
    alloc.allocate("d", 4)
    assert alloc.cached_blocks == 2 and alloc.cached_prefix_blocks(hashes) == 2
    alloc.allocate("d", 6)                              # only cached blocks are left: evict one
    # the prefix's tail block went first (freed after its head by each sequence's free)
    assert alloc.cached_blocks == 1 and alloc.cached_prefix_blocks(hashes) == 1
    alloc.free("d")
    assert alloc.allocate("e", 5, hashes) == 1


def test_a_pool_of_millions_of_blocks_is_free_to_create():
    alloc = BlockAllocator(50_000_000, 16)
    alloc.allocate(0, 100)
    assert alloc.free_blocks == 50_000_000 - 7 and alloc.block_table(0) == list(range(7))


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
def test_paged_attention_through_allocator_tables_equals_contiguous_attention(t):
    """The last ``t`` positions of each sequence attend through the block tables
    the allocator built; each equals flash_attention over the same sequence
    stored contiguously, causal among its own t queries."""
    lengths = [9, 14, 5]
    alloc, k_pool, v_pool, k_seq, v_seq = _pool_and_contiguous(jax.random.PRNGKey(0), lengths)
    assert alloc.block_table(1) != list(range(alloc.block_table(1)[0], alloc.block_table(1)[0] + 4))
    q = jax.random.normal(jax.random.PRNGKey(1), (3, t, 4, 8))
    width = max(len(alloc.block_table(b)) for b in range(3))  # shorter tables padded with block 0
    tables = jnp.asarray([alloc.block_table(b) + [0] * (width - len(alloc.block_table(b))) for b in range(3)],
                         jnp.int32)
    seq_ids = jnp.repeat(jnp.arange(3), t)
    positions = jnp.concatenate([n - t + jnp.arange(t) for n in lengths])
    flat_q = q.reshape(3 * t, 4, 8)
    got = paged_attention(flat_q, k_pool, v_pool, tables, seq_ids, positions).reshape(3, t, 4, 8)
    for b, n in enumerate(lengths):
        k, v = k_seq[b:b + 1, :n], v_seq[b:b + 1, :n]
        mask = jnp.arange(n)[None, :] <= (n - t + jnp.arange(t))[:, None]
        want = flash_attention(q[b:b + 1], k, v, mask=mask[None, None])
        np.testing.assert_allclose(got[b], want[0], rtol=1e-5, atol=1e-5)
    # compiled for MTIA: the same numbers as jax.jit
    args = (flat_q, k_pool, v_pool, tables, seq_ids, positions)
    np.testing.assert_allclose(mtia_jax.jit(paged_attention)(*args), jax.jit(paged_attention)(*args),
                               rtol=1e-6, atol=1e-6)


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
