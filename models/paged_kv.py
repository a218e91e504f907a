"""A paged KV cache, as vLLM keeps one: fixed-size blocks of token positions
in one pool per layer, and per sequence a block table mapping its logical
blocks to physical ones.

    alloc = BlockAllocator(num_blocks=1024, block_size=16)
    alloc.allocate(seq, 40)            # 3 blocks for 40 positions
    alloc.allocate(seq, 41)            # grows by one block only when it must
    table = alloc.block_table(seq)     # physical block of each logical block
    alloc.free(seq)                    # its blocks return to the pool

Prefix caching (vLLM's automatic prefix caching). A full block is named by
the hash of its tokens chained with its predecessor's hash
(``block_hashes``), so equal hashes mean equal prefixes. Once its keys and
values are computed, a sequence marks the block with its hash
(``cache_block``); a later sequence whose prompt starts with the same blocks
attaches them instead of computing them (``allocate(seq, n, prefix=hashes)``
returns how many it attached). Blocks are reference counted; a freed block
that holds a cached prefix stays cached until the pool needs it (free blocks
without a prefix are handed out first, then cached ones, least recently
freed first).

``paged_attention`` (``mtia_jax.primitives``) attends each query token over
its sequence's positions through the block table.

A fixed-slot cache reserves the longest sequence's capacity for every
sequence; a paged one holds ceil(length / block_size) blocks per sequence,
so a workload of mixed lengths fits many more sequences in the same HBM
(``concurrent_sequences``).
"""

from __future__ import annotations

import collections
import math
from typing import Hashable, Iterable, Sequence

DEFAULT_BLOCK_SIZE = 16  # tokens per block: vLLM's default


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a sequence needs (the scheduler
    preempts a sequence or waits)."""


def block_hashes(tokens: Sequence[int], block_size: int, known: Sequence[int] = ()) -> list[int]:
    """The hash of each full block of ``tokens``: its tokens chained with the
    previous block's hash (so a block's hash names the whole prefix up to
    it). ``known``: the hashes of the leading blocks, already computed."""
    out = list(known)
    parent = out[-1] if out else None
    for start in range(len(out) * block_size, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(int(t) for t in tokens[start:start + block_size])))
        out.append(parent)
    return out


class BlockAllocator:
    """Fixed-size, reference-counted blocks of a KV pool handed to sequences
    and taken back, with a cache of full blocks by prefix hash."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockAllocator: num_blocks and block_size must be >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._fresh = 0          # blocks >= this were never handed out
        self._recycled: list[int] = []  # freed blocks holding no cached prefix: a stack
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # free, cached
        self._refs: dict[int, int] = {}  # held blocks -> how many sequences hold them
        self._hash_of: dict[int, Hashable] = {}
        self._block_of: dict[Hashable, int] = {}
        self._tables: dict[Hashable, list[int]] = {}

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds (cached prefixes among them)."""
        return self.num_blocks - self._fresh + len(self._recycled) + len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        return len(self._block_of)

    def cached_prefix_blocks(self, prefix: Sequence[Hashable]) -> int:
        """How many leading hashes of ``prefix`` name cached blocks."""
        return len(self._cached_prefix(prefix))

    def _cached_prefix(self, prefix: Sequence[Hashable]) -> list[int]:
        blocks = []
        for h in prefix:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _shortfall(self, seq: Hashable, positions: int, prefix: Sequence[Hashable]) -> tuple[int, list[int]]:
        """(new blocks needed beyond the free ones, cached blocks to attach)."""
        table = self._tables.get(seq)
        attach = self._cached_prefix(prefix) if not table else []
        attach = attach[:self.blocks_for(positions)]
        held = len(table or ()) + len(attach)
        revived = sum(b not in self._refs for b in attach)  # cached blocks taken off the free list
        return self.blocks_for(positions) - held - (self.free_blocks - revived), attach

    def can_allocate(self, seq: Hashable, positions: int, prefix: Sequence[Hashable] = ()) -> bool:
        return self._shortfall(seq, positions, prefix)[0] <= 0

    def allocate(self, seq: Hashable, positions: int, prefix: Sequence[Hashable] = ()) -> int:
        """Grow ``seq``'s table to hold ``positions`` positions (never shrinks).
        A sequence that holds no blocks yet first attaches the cached blocks
        of the leading hashes of ``prefix`` (``block_hashes`` of its tokens);
        returns how many it attached. Raises ``OutOfBlocks`` (changing
        nothing) when the pool is short."""
        if positions < 0:
            raise ValueError(f"allocate: positions must be >= 0, got {positions}")
        short, attach = self._shortfall(seq, positions, prefix)
        if short > 0:
            need = self.blocks_for(positions) - len(self._tables.get(seq, ())) - len(attach)
            raise OutOfBlocks(f"sequence {seq!r} needs {need} more blocks of {self.block_size} "
                              f"positions; {self.free_blocks} of {self.num_blocks} are free")
        table = self._tables.setdefault(seq, [])
        for block in attach:
            if block not in self._refs:
                del self._evictable[block]
            self._refs[block] = self._refs.get(block, 0) + 1
            table.append(block)
        while len(table) < self.blocks_for(positions):
            table.append(self._take())
        return len(attach)

    def _take(self) -> int:
        if self._recycled:
            block = self._recycled.pop()
        elif self._fresh < self.num_blocks:
            block, self._fresh = self._fresh, self._fresh + 1
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def cache_block(self, seq: Hashable, index: int, block_hash: Hashable) -> None:
        """Mark ``seq``'s logical block ``index`` (full, its keys and values
        computed) as the cached block of ``block_hash``; a prefix already
        cached in another block keeps that one."""
        block = self._tables[seq][index]
        if block_hash not in self._block_of and block not in self._hash_of:
            self._hash_of[block], self._block_of[block_hash] = block_hash, block

    def free(self, seq: Hashable) -> None:
        """Return ``seq``'s blocks to the pool (a block shared with another
        sequence stays with it); KeyError for a sequence that holds none
        (freed twice, or never allocated)."""
        try:
            table = self._tables.pop(seq)
        except KeyError:
            raise KeyError(f"free: sequence {seq!r} holds no blocks (freed already, or never "
                           f"allocated)") from None
        for block in reversed(table):  # a sequence's last blocks are the first to evict
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._recycled.append(block)

    def block_table(self, seq: Hashable) -> list[int]:
        return list(self._tables.get(seq, ()))

    def refs(self, block: int) -> int:
        """How many sequences hold ``block``."""
        return self._refs.get(block, 0)

    @property
    def sequences(self) -> tuple:
        return tuple(self._tables)


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


__all__ = ["BlockAllocator", "OutOfBlocks", "block_hashes", "concurrent_sequences", "DEFAULT_BLOCK_SIZE"]
