"""A paged KV cache, as vLLM keeps one: fixed-size blocks of token positions
in one pool per layer, and per sequence a block table mapping its logical
blocks to physical ones.

    alloc = BlockAllocator(num_blocks=1024, block_size=16)
    alloc.allocate(seq, 40)            # 3 blocks for 40 positions
    alloc.allocate(seq, 41)            # grows by one block only when it must
    table = alloc.block_table(seq)     # physical block of each logical block
    alloc.free(seq)                    # its blocks return to the pool

``paged_attention(q, k_pool, v_pool, block_tables, lengths)`` attends each
sequence's query over the positions its block table holds; it equals
attention over the same keys and values stored contiguously.

A fixed-slot cache reserves the longest sequence's capacity for every
sequence; a paged one holds ceil(length / block_size) blocks per sequence,
so a workload of mixed lengths fits many more sequences in the same HBM
(``concurrent_sequences``).
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable

import jax
import jax.numpy as jnp

from mtia_jax.primitives import flash_attention

DEFAULT_BLOCK_SIZE = 16  # tokens per block: vLLM's default


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a sequence needs (the scheduler
    preempts a sequence or waits)."""


class BlockAllocator:
    """Fixed-size blocks of a KV pool handed to sequences and taken back."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockAllocator: num_blocks and block_size must be >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block is reused first
        self._tables: dict[Hashable, list[int]] = {}

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Hashable, positions: int) -> bool:
        have = len(self._tables.get(seq, ()))
        return self.blocks_for(positions) - have <= len(self._free)

    def allocate(self, seq: Hashable, positions: int) -> list[int]:
        """Grow ``seq``'s table to hold ``positions`` positions (never shrinks);
        raises ``OutOfBlocks`` (allocating nothing) when the pool is short."""
        if positions < 0:
            raise ValueError(f"allocate: positions must be >= 0, got {positions}")
        table = self._tables.get(seq, [])
        need = self.blocks_for(positions) - len(table)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq!r} needs {need} more blocks of {self.block_size} "
                              f"positions; {len(self._free)} of {self.num_blocks} are free")
        for _ in range(max(need, 0)):
            table.append(self._free.pop())
        self._tables[seq] = table
        return list(table)

    def free(self, seq: Hashable) -> None:
        """Return ``seq``'s blocks to the pool; KeyError for a sequence that
        holds none (freed twice, or never allocated)."""
        try:
            table = self._tables.pop(seq)
        except KeyError:
            raise KeyError(f"free: sequence {seq!r} holds no blocks (freed already, or never "
                           f"allocated)") from None
        self._free.extend(reversed(table))

    def block_table(self, seq: Hashable) -> list[int]:
        return list(self._tables.get(seq, ()))

    @property
    def sequences(self) -> tuple:
        return tuple(self._tables)

    def padded_tables(self, seqs: Iterable[Hashable], width: int | None = None) -> jnp.ndarray:
        """(len(seqs), width) int32 block tables, padded with block 0 (its
        positions lie past each sequence's length, so they are masked)."""
        tables = [self._tables.get(s, []) for s in seqs]
        width = max((len(t) for t in tables), default=0) if width is None else width
        if any(len(t) > width for t in tables):
            raise ValueError(f"padded_tables: a table is longer than width {width}")
        return jnp.asarray([t + [0] * (width - len(t)) for t in tables], jnp.int32).reshape(len(tables), width)


def paged_attention(q, k_pool, v_pool, block_tables, lengths, *, scale=None):
    """Attention of ``q`` (B, T, N, H), the last T positions of each sequence
    (causal among themselves), over the keys and values of a paged pool
    ``k_pool``/``v_pool`` (num_blocks, block_size, K, H) through
    ``block_tables`` (B, blocks) and valid ``lengths`` (B,): the gathered
    blocks of each sequence, in table order, are its positions."""
    b, t = q.shape[:2]
    blocks, block_size = block_tables.shape[1], k_pool.shape[1]
    k = jnp.take(k_pool, block_tables, axis=0).reshape(b, blocks * block_size, *k_pool.shape[2:])
    v = jnp.take(v_pool, block_tables, axis=0).reshape(b, blocks * block_size, *v_pool.shape[2:])
    lengths = jnp.asarray(lengths, jnp.int32)
    if t == 1:  # decode: every valid position is visible
        return flash_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths)
    # the queries sit at positions lengths - T .. lengths - 1
    rows = lengths[:, None] - t + jnp.arange(t)[None, :]                      # (B, T)
    cols = jnp.arange(blocks * block_size)[None, None, :]                     # (1, 1, S)
    mask = (cols <= rows[:, :, None]) & (cols < lengths[:, None, None])       # (B, T, S)
    return flash_attention(q, k, v, scale=scale, mask=mask[:, None])


def concurrent_sequences(lengths: Iterable[int], budget_positions: int, *, max_len: int,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """(fixed-slot, paged) number of the first sequences of ``lengths`` (in
    order) whose KV fits ``budget_positions`` positions: a fixed slot
    reserves ``max_len`` positions per sequence, a paged cache
    ceil(length / block_size) blocks."""
    lengths = list(lengths)
    if any(n > max_len for n in lengths):
        raise ValueError(f"concurrent_sequences: a length exceeds max_len {max_len}")
    fixed = min(len(lengths), budget_positions // max_len)
    blocks, paged = budget_positions // block_size, 0
    for n in lengths:
        need = math.ceil(n / block_size)
        if need > blocks:
            break
        blocks -= need
        paged += 1
    return fixed, paged


__all__ = ["BlockAllocator", "OutOfBlocks", "paged_attention", "concurrent_sequences", "DEFAULT_BLOCK_SIZE"]
