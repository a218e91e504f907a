"""vLLM's scheduler over a paged KV cache: which tokens of which sequences
one serving step computes. One scheduler serves the engine that runs the
numerics (``models.serving``) and the one that runs shapes only on the
modeled clock (``models.serving_sim``), so both batch, chunk, cache and
preempt alike.

    sched = Scheduler(num_blocks=4096, block_size=16, max_num_seqs=256,
                      max_num_batched_tokens=2048)
    sched.add(Sequence(id=0, num_tokens=len(prompt), token_ids=list(prompt)))
    step = sched.schedule()            # [(sequence, tokens to compute)]
    ...                                # run the step
    for seq in sched.update(step):     # every known token computed: sample one
        seq.append(token)
        if finished: sched.finish(seq)

A sequence knows ``num_tokens`` tokens (its prompt, then those generated)
and holds the keys and values of the first ``computed`` of them. A step,
in vLLM's order:

1. *Running sequences first*, in admission order: each gets its uncomputed
   tokens (one, for a decoding sequence; the rest of its prompt, for one
   whose prefill was chunked), up to what is left of the token budget
   ``max_num_batched_tokens``. When the pool cannot hold a sequence's new
   positions, the most recently admitted running sequence is *preempted*:
   its blocks are freed and it goes back to the front of the queue, to be
   recomputed (prompt and generated tokens) when readmitted.
2. *Then the queue*, first come first served, while fewer than
   ``max_num_seqs`` sequences run and budget remains, and no sequence was
   preempted this step: a sequence's prompt blocks already in the prefix
   cache are attached, not computed (``prefix_caching``, for sequences
   that carry ``token_ids``); the rest is scheduled whole, or with
   ``chunked_prefill`` the part that fits the budget. A sequence that does
   not fit waits, and so does everything behind it.

After the step (``update``), each scheduled sequence has computed its
tokens and its newly full blocks enter the prefix cache; the sequences
with every known token computed are returned: the step's logits at their
last token give their next token.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence as Seq

from models.paged_kv import BlockAllocator, block_hashes

__all__ = ["Scheduler", "Sequence"]


class Sequence:
    """What the scheduler knows of one request: ``num_tokens`` known tokens
    (their ids in ``token_ids`` when prefix caching may use them) of which
    the first ``computed`` have their keys and values in the pool."""

    def __init__(self, id: int, num_tokens: int, token_ids: Seq[int] | None = None):
        if num_tokens < 1:
            raise ValueError(f"Sequence {id}: num_tokens must be >= 1, got {num_tokens}")
        self.id, self.num_tokens = id, num_tokens
        self.token_ids = None if token_ids is None else list(token_ids)
        self.computed = 0
        self.hashes: list[int] = []   # of its full blocks, as far as computed
        self.cached = 0               # leading blocks marked in the prefix cache

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.computed

    def append(self, token_id: int | None = None) -> None:
        """One more known token (a generated one)."""
        self.num_tokens += 1
        if self.token_ids is not None:
            self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, num_tokens={self.num_tokens}, computed={self.computed})"


class Scheduler:
    """Continuous batching over a paged KV cache (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, *, max_num_seqs: int,
                 max_num_batched_tokens: int, chunked_prefill: bool = True,
                 prefix_caching: bool = True):
        self.blocks = BlockAllocator(num_blocks, block_size)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.chunked_prefill, self.prefix_caching = chunked_prefill, prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_cached_tokens = 0   # tokens attached from the prefix cache instead of computed
        self.peak_blocks = 0

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (last)."""
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.id)
        self.running.remove(seq)
        seq.computed = seq.cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _prefix(self, seq: Sequence) -> list[int]:
        """The hashes of the blocks ``seq`` may take from the prefix cache: its
        full blocks but the one holding its last token, whose logits are needed."""
        if not self.prefix_caching or seq.token_ids is None:
            return []
        seq.hashes = block_hashes(seq.token_ids, self.block_size, seq.hashes)
        return seq.hashes[:(seq.num_tokens - 1) // self.block_size]

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) of the next step, blocks allocated."""
        budget, scheduled, preempted = self.max_num_batched_tokens, [], False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted for an earlier sequence this step
                continue
            n = min(seq.uncomputed, budget)
            while not self.blocks.can_allocate(seq.id, seq.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq.id, seq.computed + n)
                scheduled.append((seq, n))
                budget -= n
        bs = self.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            prefix = self._prefix(seq)
            hit = self.blocks.cached_prefix_blocks(prefix) * bs
            n = seq.num_tokens - hit
            if self.chunked_prefill:
                n = min(n, budget)
            if n > budget or not self.blocks.can_allocate(seq.id, hit + n, prefix):
                break
            seq.cached = self.blocks.allocate(seq.id, hit + n, prefix)
            seq.computed = seq.cached * bs
            self.prefix_cached_tokens += seq.computed
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        self.peak_blocks = max(self.peak_blocks, self.blocks.num_blocks - self.blocks.free_blocks)
        return scheduled

    def update(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Record that ``scheduled`` ran; returns the sequences whose known
        tokens are now all computed (each samples its next token)."""
        ready = []
        for seq, n in scheduled:
            seq.computed += n
            if self.prefix_caching and seq.token_ids is not None:
                full = seq.computed // self.block_size
                seq.hashes = block_hashes(seq.token_ids[:full * self.block_size], self.block_size,
                                          seq.hashes[:full])
                for index in range(seq.cached, full):
                    self.blocks.cache_block(seq.id, index, seq.hashes[index])
                seq.cached = max(seq.cached, full)
            if seq.uncomputed == 0:
                ready.append(seq)
        return ready

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done: its blocks return to the pool (full ones stay cached)."""
        self.blocks.free(seq.id)
        self.running.remove(seq)
