"""A serving engine on the modeled clock, from shapes only: vLLM-style
scheduling of a load (``models.load``) over a paged KV cache
(``models.paged_kv``), with each step's time from ``mtia_jax.estimate`` of
the transformer's own programs. No numerics run, so the real presets
(Llama-3-70B on 8 chips) are served in minutes on a laptop.

    sim = ServingSimulator(tf.Config.preset("llama3-70b"), chip="mtia450", mesh=mesh,
                           precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"))
    result = sim.run(load.poisson(rate=4.0, n=200))
    print(result.metrics.row())

Scheduling: ``models.scheduler``, the scheduler the numerics engine
(``models.serving``) runs, with vLLM V1's defaults: a token budget of
``max_num_batched_tokens`` (2048) per step, running sequences first (one
token each when decoding, the rest of a chunked prompt), then queued
requests first come first served, in chunks (``chunked_prefill=True``;
off: a prompt is prefilled whole or waits), up to ``max_num_seqs`` (256)
sequences; KV blocks of ``block_size`` (16) positions from a pool of
``kv_blocks`` (default: what the HBM left after the weights holds);
preemption with recompute when the pool runs dry; prefix caching
(``prefix_caching=True``) for requests that share a prompt prefix
(``load.with_shared_prefix``, or a trace's ``prefix_id``): their prefix
blocks are computed once while cached. A load carries lengths, not text,
so nothing else is shared.

Step time. A step is one ``models.transformer.paged_step`` program, as the
engine runs it: its N scheduled tokens (prefill chunks and decode tokens
together), B sequences and block tables of W blocks, each rounded up to a
power of two, estimated from shapes on the chip (``mtia_jax.estimate``,
per device on a mesh) and cached. The weights are read once per step
however its tokens mix. Attention is charged as ``paged_attention``'s cost
rule charges it: every query token against the step's widest table (W
blocks), and each sequence's W blocks read once, so a step mixing one long
context with short ones is charged as if all were long (an upper bound).

Energy. Each step's modeled energy (``runtime.power``: idle power plus
compute and HBM activity) over every device, and the idle power while no
request is in flight, from the first arrival to the last token:
``SimResult.joules_per_token`` is what a token costs at that load.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import deque

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import mtia_jax
from models import load, transformer as tf
from models.paged_kv import DEFAULT_BLOCK_SIZE
from models.scheduler import Scheduler, Sequence
from models.serving import kv_cache_bytes, weight_bytes
from runtime import power


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _shardings(cfg: tf.Config, mesh) -> tuple:
    """(params, pool) PartitionSpecs on ``mesh``, or Nones without one."""
    return tf.pool_shardings(cfg, mesh) if mesh is not None else (None, None)


class StepTimes:
    """Modeled seconds of ``paged_step`` programs, estimated from shapes and cached."""

    def __init__(self, cfg: tf.Config, *, chip, mesh=None, precision=None, kv_blocks: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.cfg, self.chip, self.mesh, self.precision = cfg, chip, mesh, precision
        self.kv_blocks, self.block_size = kv_blocks, block_size
        self.params = tf.param_shapes(cfg)
        self.estimates = 0

    def step(self, tokens: int, seqs: int, width: int) -> float:
        """Modeled seconds of one step of ``tokens`` tokens of ``seqs``
        sequences whose block tables are at most ``width`` blocks."""
        return self._step(_bucket(tokens, 16), _bucket(seqs), _bucket(width))[0]

    def joules(self, tokens: int, seqs: int, width: int) -> float:
        """Modeled energy of that step over every device (``runtime.power``)."""
        return self._step(_bucket(tokens, 16), _bucket(seqs), _bucket(width))[1]

    @property
    def idle_watts(self) -> float:
        """Power of the devices while no step runs (``runtime.power``'s idle power)."""
        devices = math.prod(self.mesh.axis_sizes) if self.mesh is not None else 1
        return power.idle_watts(mtia_jax.chips.get(self.chip)) * devices

    @functools.lru_cache(maxsize=None)
    def _step(self, n: int, b: int, w: int) -> tuple[float, float]:
        self.estimates += 1
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        pool = jax.eval_shape(functools.partial(tf.init_kv_pool, self.cfg, self.kv_blocks, self.block_size))
        args = (i32(n), i32(n), i32(n), i32(n), i32(b, w), i32(b), pool)
        sharded = {}
        if self.mesh is not None:
            pspecs, pool_specs = _shardings(self.cfg, self.mesh)
            sharded = dict(mesh=self.mesh, in_shardings=(pspecs, *(P(),) * 6, pool_specs))
        report = mtia_jax.estimate(functools.partial(tf.paged_step, self.cfg), self.params, *args,
                                   chip=self.chip, precision=self.precision, donate_argnums=(7,),
                                   **sharded)
        return report.time_s, report.energy().joules * report.devices


_PREFIX_SPAN = 1 << 32  # ids of one prefix or one request: positions below this


class _Sequence(Sequence):
    """A request of the load: the scheduler's view of it and the modeled time
    of each of its output tokens. A request with a shared prefix carries
    token ids, so the prefix cache can match it: its prefix's ids are its
    group's (negative, ``-1 - position``-based), every other id its own."""

    def __init__(self, id: int, request: load.LoadRequest):
        ids = None
        if request.prefix_id is not None:
            shared = [-(request.prefix_id * _PREFIX_SPAN + i) - 1 for i in range(request.prefix_len)]
            ids = shared + [self._own(id, i) for i in range(request.prefix_len, request.prompt_len)]
        super().__init__(id, request.prompt_len, ids)
        self.request = request
        self.times: list[float] = []

    @staticmethod
    def _own(id: int, position: int) -> int:
        return id * _PREFIX_SPAN + position

    def append(self, token_id=None) -> None:
        super().append(self._own(self.id, self.num_tokens) if self.token_ids is not None else None)


@dataclasses.dataclass(frozen=True)
class SimResult:
    metrics: load.Metrics
    steps: int
    preemptions: int
    max_running: int
    kv_blocks: int
    joules: float = 0.0   # modeled, every device, from the first arrival to the last token (idle gaps included)
    prefix_cached_tokens: int = 0   # prompt tokens served by the prefix cache instead of computed
    prompt_tokens: int = 0          # of every request served

    @property
    def joules_per_token(self) -> float:
        return self.joules / self.metrics.output_tokens if self.metrics.output_tokens else 0.0


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
    prefix_caching: bool = True
    slo: load.SLO = load.SLO()

    def __post_init__(self):
        if self.kv_blocks is None:
            self.kv_blocks = self._blocks_that_fit()
        self.times = StepTimes(self.cfg, chip=self.chip, mesh=self.mesh, precision=self.precision,
                               kv_blocks=self.kv_blocks, block_size=self.block_size)

    def _blocks_that_fit(self) -> int:
        """KV blocks that fit 90 % of each device's HBM after its weights
        (``models.serving.weight_bytes``: MX weights packed, shards divided)
        with the KV heads split as ``tf.pool_shardings`` splits them."""
        spec = mtia_jax.chips.get(self.chip)
        pspecs, pool_specs = _shardings(self.cfg, self.mesh)
        weights = weight_bytes(tf.param_shapes(self.cfg), self.precision, pspecs, self.mesh)
        one_block = kv_cache_bytes(jax.eval_shape(functools.partial(tf.init_kv_pool, self.cfg, 1,
                                                                    self.block_size)), pool_specs, self.mesh)
        free = 0.9 * spec.hbm_bytes - weights
        if free < one_block:
            raise ValueError(f"ServingSimulator: the weights ({weights / 1e9:.1f} GB per device) leave no "
                             f"HBM for the KV cache on {self.chip}")
        return int(free // one_block)

    def run(self, requests: list[load.LoadRequest], progress=None) -> SimResult:
        """Serve ``requests`` on the modeled clock; ``progress``: a tqdm bar (or
        anything with ``update(n)``) advanced per finished request."""
        sched = Scheduler(self.kv_blocks, self.block_size, max_num_seqs=self.max_num_seqs,
                          max_num_batched_tokens=self.max_num_batched_tokens,
                          chunked_prefill=self.chunked_prefill, prefix_caching=self.prefix_caching)
        future = deque(_Sequence(i, r) for i, r in enumerate(sorted(requests, key=lambda r: r.arrival_s)))
        finished: list[_Sequence] = []
        clock = future[0].request.arrival_s if future else 0.0
        steps, max_running, joules = 0, 0, 0.0
        while future or not sched.done:
            while future and future[0].request.arrival_s <= clock:
                sched.add(future.popleft())
            if sched.done:  # idle until the next arrival
                joules += self.times.idle_watts * (future[0].request.arrival_s - clock)
                clock = future[0].request.arrival_s
                continue
            scheduled = sched.schedule()
            if not scheduled:
                waiting = sched.waiting[0]
                raise RuntimeError(f"ServingSimulator: a request of {waiting.request.prompt_len} prompt "
                                   f"tokens cannot be scheduled with {self.kv_blocks} KV blocks and a "
                                   f"budget of {self.max_num_batched_tokens} tokens")
            width = max(len(sched.blocks.block_table(seq.id)) for seq, _ in scheduled)
            shape = (sum(n for _, n in scheduled), len(scheduled), width)
            clock += self.times.step(*shape)
            joules += self.times.joules(*shape)
            steps += 1
            max_running = max(max_running, len(sched.running))
            for seq in sched.update(scheduled):
                seq.times.append(clock)
                seq.append()
                if len(seq.times) >= seq.request.output_len:
                    sched.finish(seq)
                    finished.append(seq)
            if progress is not None:
                progress.update(len(finished) - getattr(progress, "n", 0))
        finished.sort(key=lambda s: s.id)
        m = load.metrics([s.request.arrival_s for s in finished], [s.times for s in finished], self.slo)
        return SimResult(m, steps, preemptions=sched.preemptions, max_running=max_running,
                         kv_blocks=self.kv_blocks, joules=joules,
                         prefix_cached_tokens=sched.prefix_cached_tokens,
                         prompt_tokens=sum(s.request.prompt_len for s in finished))


__all__ = ["ServingSimulator", "StepTimes", "SimResult"]
