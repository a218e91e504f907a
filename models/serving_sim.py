"""A serving engine on the modeled clock, from shapes only: vLLM-style
scheduling of a load (``models.load``) over a paged KV cache
(``models.paged_kv``), with each step's time from ``mtia_jax.estimate`` of
the transformer's own programs. No numerics run, so the real presets
(Llama-3-70B on 8 chips) are served in minutes on a laptop.

    sim = ServingSimulator(tf.Config.preset("llama3-70b"), chip="mtia450", mesh=mesh,
                           precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"))
    result = sim.run(load.poisson(rate=4.0, n=200))
    print(result.metrics.row())

Scheduling, per step (the defaults are vLLM's V1 engine's):

- the running sequences decode one token each;
- the rest of the step's token budget (``max_num_batched_tokens``, 2048)
  goes to prompts, first come first served, in chunks (chunked prefill,
  ``chunked_prefill=True``; off: a prompt is prefilled whole or waits), up
  to ``max_num_seqs`` (256) sequences in the batch;
- a sequence holds KV blocks of ``block_size`` (16) positions from a pool of
  ``kv_blocks`` (default: what the HBM left after the weights holds); a
  prompt is admitted only when its blocks are free; when a decoding
  sequence needs a block and none is free, the most recently admitted
  sequence is preempted (its blocks freed, its prompt and tokens so far
  prefilled again later: recompute).

Step time. A step that decodes B sequences of context up to S and
prefills P prompt tokens costs ``decode(B, S) + prefill(P)``, each a
modeled time of ``models.transformer.decode`` / ``prefill`` on shapes,
bucketed to powers of two (B, S, P rounded up) and cached. Summing the two
charges the weights twice where one fused step would read them once, so a
mixed step is an upper bound; a prefill chunk's attention to the earlier
chunks of its prompt is not charged (a lower bound on that part). Both are
stated rather than hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import deque

import jax
import jax.numpy as jnp

import mtia_jax
from models import load, transformer as tf
from models.paged_kv import DEFAULT_BLOCK_SIZE, BlockAllocator
from models.serving import kv_cache_bytes, weight_bytes


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class StepTimes:
    """Modeled seconds of decode and prefill steps, estimated from shapes and cached."""

    def __init__(self, cfg: tf.Config, *, chip, mesh=None, precision=None):
        self.cfg, self.chip, self.mesh, self.precision = cfg, chip, mesh, precision
        self.params = tf.param_shapes(cfg)
        self.estimates = 0

    def _estimate(self, fn, args, in_shardings, donate: int) -> float:
        self.estimates += 1
        sharded = dict(mesh=self.mesh, in_shardings=in_shardings) if self.mesh is not None else {}
        return mtia_jax.estimate(fn, self.params, *args, chip=self.chip, precision=self.precision,
                                 donate_argnums=(donate,), **sharded).time_s

    def shardings(self, batch: int):
        """(params, cache, tokens) PartitionSpecs on the mesh, or Nones."""
        return tf.shardings(self.cfg, self.mesh, batch) if self.mesh is not None else (None, None, None)

    def decode(self, batch: int, context: int) -> float:
        """One decode step of ``batch`` sequences of context up to ``context``."""
        return self._decode(_bucket(batch), _bucket(context, 256))

    def prefill(self, tokens: int) -> float:
        """Prefilling ``tokens`` prompt tokens (one sequence's shapes)."""
        return self._prefill(_bucket(tokens, 16))

    @functools.lru_cache(maxsize=None)
    def _decode(self, b: int, s: int) -> float:
        pspecs, cspecs, tspec = self.shardings(b)
        return self._estimate(functools.partial(tf.decode, self.cfg),
                              (jax.ShapeDtypeStruct((b,), jnp.int32), tf.cache_shapes(self.cfg, b, s)),
                              (pspecs, tspec, cspecs), donate=2)

    @functools.lru_cache(maxsize=None)
    def _prefill(self, t: int) -> float:
        pspecs, cspecs, tspec = self.shardings(1)
        return self._estimate(functools.partial(tf.prefill, self.cfg),
                              (jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
                               tf.cache_shapes(self.cfg, 1, t)),
                              (pspecs, jax.sharding.PartitionSpec(), tspec, cspecs), donate=3)


@dataclasses.dataclass
class _Sequence:
    id: int
    request: load.LoadRequest
    cached: int = 0              # positions whose keys and values are in the cache
    tokens: list = dataclasses.field(default_factory=list)   # output token times
    admitted: float = 0.0

    @property
    def pending(self) -> int:
        """Positions still to prefill: the prompt, and after a preemption the
        tokens generated before it (the last token is fed by decode)."""
        return self.request.prompt_len + max(len(self.tokens) - 1, 0) - self.cached

    @property
    def decoding(self) -> bool:
        return bool(self.tokens) and self.pending == 0

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.request.output_len


@dataclasses.dataclass(frozen=True)
class SimResult:
    metrics: load.Metrics
    steps: int
    preemptions: int
    max_running: int
    kv_blocks: int


@dataclasses.dataclass
class ServingSimulator:
    cfg: tf.Config
    chip: str = "mtia450"
    mesh: object = None
    precision: object = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_blocks: int | None = None
    chunked_prefill: bool = True
    slo: load.SLO = load.SLO()

    def __post_init__(self):
        self.times = StepTimes(self.cfg, chip=self.chip, mesh=self.mesh, precision=self.precision)
        if self.kv_blocks is None:
            self.kv_blocks = self._blocks_that_fit()

    def _blocks_that_fit(self) -> int:
        """KV blocks that fit 90 % of each device's HBM after its weights
        (``models.serving.weight_bytes``: MX weights packed, shards divided)
        with the KV heads split as ``tf.shardings`` splits them."""
        spec = mtia_jax.chips.get(self.chip)
        pspecs, cspecs, _ = self.times.shardings(1)
        weights = weight_bytes(self.times.params, self.precision, pspecs, self.mesh)
        one_block = kv_cache_bytes({name: leaf for name, leaf in tf.cache_shapes(
            self.cfg, 1, self.block_size).items() if name != "lengths"}, cspecs, self.mesh)
        free = 0.9 * spec.hbm_bytes - weights
        if free < one_block:
            raise ValueError(f"ServingSimulator: the weights ({weights / 1e9:.1f} GB per device) leave no "
                             f"HBM for the KV cache on {self.chip}")
        return int(free // one_block)

    def run(self, requests: list[load.LoadRequest], progress=None) -> SimResult:
        """Serve ``requests`` on the modeled clock; ``progress``: a tqdm bar (or
        anything with ``update(n)``) advanced per finished request."""
        alloc = BlockAllocator(self.kv_blocks, self.block_size)
        future = deque(_Sequence(i, r) for i, r in enumerate(sorted(requests, key=lambda r: r.arrival_s)))
        queue: deque[_Sequence] = deque()
        running: list[_Sequence] = []
        finished: list[_Sequence] = []
        clock, steps, preemptions, max_running = 0.0, 0, 0, 0
        while future or queue or running:
            while future and future[0].request.arrival_s <= clock:
                queue.append(future.popleft())
            if not queue and not running:
                clock = future[0].request.arrival_s
                continue
            decoding = [s for s in running if s.decoding]
            for s in list(decoding):  # one more position each; preempt the newest if the pool is dry
                while s in running and not alloc.can_allocate(s.id, s.cached + 1):
                    victim = max(running, key=lambda r: (r.admitted, r.id))
                    running.remove(victim)
                    if victim in decoding:
                        decoding.remove(victim)
                    alloc.free(victim.id)
                    victim.cached = 0
                    queue.appendleft(victim)
                    preemptions += 1
                if s in running:
                    alloc.allocate(s.id, s.cached + 1)
            budget = self.max_num_batched_tokens - len(decoding)
            chunks: list[tuple[_Sequence, int]] = []
            candidates = [r for r in running if r.pending > 0]
            while queue and len(running) < self.max_num_seqs:
                if not self._admit(queue[0], alloc, budget - sum(t for _, t in chunks)):
                    break
                s = queue.popleft()
                s.admitted = clock
                running.append(s)
                candidates.append(s)
            for s in candidates:  # running prompts first, then the newly admitted, in order
                take = min(s.pending, budget) if self.chunked_prefill else s.pending
                if take <= 0 or take > budget or not alloc.can_allocate(s.id, s.cached + take):
                    continue
                alloc.allocate(s.id, s.cached + take)
                chunks.append((s, take))
                budget -= take
            if not decoding and not chunks:
                if not running and queue:
                    raise RuntimeError(f"ServingSimulator: a request of {queue[0].request.prompt_len} prompt "
                                       f"tokens cannot be scheduled with {self.kv_blocks} KV blocks and a "
                                       f"budget of {self.max_num_batched_tokens} tokens")
                clock = future[0].request.arrival_s if future else clock
                continue
            context = max((s.cached for s in decoding), default=0)
            clock += ((self.times.decode(len(decoding), context) if decoding else 0.0)
                      + (self.times.prefill(sum(t for _, t in chunks)) if chunks else 0.0))
            steps += 1
            max_running = max(max_running, len(running))
            for s in decoding:
                s.cached += 1
                s.tokens.append(clock)
            for s, take in chunks:
                s.cached += take
                if s.pending == 0 and not s.tokens:  # the prompt's last chunk samples the first token
                    s.tokens.append(clock)
            for s in [r for r in running if r.done]:
                running.remove(s)
                alloc.free(s.id)
                finished.append(s)
            if progress is not None:
                progress.update(len(finished) - getattr(progress, "n", 0))
        finished.sort(key=lambda s: s.id)
        m = load.metrics([s.request.arrival_s for s in finished], [s.tokens for s in finished], self.slo)
        return SimResult(m, steps, preemptions, max_running, self.kv_blocks)

    def _admit(self, s: _Sequence, alloc: BlockAllocator, budget: int) -> bool:
        """A queued sequence starts when its first chunk (its whole prompt
        without chunked prefill) fits the budget and the free blocks."""
        first = min(s.pending, budget) if self.chunked_prefill else s.pending
        return 0 < first <= budget and alloc.can_allocate(s.id, s.cached + first)


__all__ = ["ServingSimulator", "StepTimes", "SimResult"]
