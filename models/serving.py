"""A serving engine for ``models.transformer`` as vLLM runs one: a paged KV
cache, continuous batching of prefill chunks and decode tokens under a
per-step token budget, prefix caching and preemption, compiled with
``mtia_jax.jit``.

    engine = ServingEngine(cfg, params, chip="mtia450",
                           precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"))
    engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=16))
    engine.submit(Request(prompt=[4, 5], max_new_tokens=8,
                          sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7)))
    results = engine.run()          # list of Result, in submission order
    print(engine.stats().table())   # host and modeled tokens/s, TTFT, ITL p50/p99, HBM

The KV cache is one pool of ``num_blocks`` blocks of ``block_size``
positions per layer (``models.transformer.init_kv_pool``); each sequence
holds the blocks its positions need (``models.paged_kv.BlockAllocator``).

How a step runs (``ServingEngine.step``):

1. *Schedule* (``models.scheduler``, vLLM's scheduler): running sequences
   first, each with its uncomputed tokens (one when decoding; the rest of
   a chunked prompt), then queued requests first come first served, up to
   ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens. A
   request's prompt blocks already in the prefix cache are attached, not
   computed (``prefix_caching``, default on); a prompt that does not fit
   the budget is split over steps (``chunked_prefill``, default on) or
   waits. When the pool runs out of blocks the most recently admitted
   sequence is preempted and later recomputed (prompt and generated
   tokens); its tokens do not change, its sampler state is kept.
2. *Run* one program (``models.transformer.paged_step``): every
   scheduled token of every sequence, flattened into one ragged batch,
   writes its key and value into the pool and attends through its
   sequence's block table (``paged_attention``).
3. *Sample*: a sequence whose tokens are all computed samples its next
   token from its last token's logits; a request finishes on its EOS id or
   ``max_new_tokens`` tokens, and its blocks return to the pool (full
   blocks stay in the prefix cache).

Programs are compiled per power-of-two bucket of the step's tokens (at least
``min_bucket``), sequences and block-table width, so few are built.
Greedy tokens equal each request run alone (``transformer.prefill`` and
``decode`` at batch 1) however the steps batch, chunk, cache or preempt it.

Sampling runs on the host from the float32 logits, one ``numpy`` generator
per request seeded by ``SamplingParams.seed``, so a request's tokens do not
depend on which other requests share its batch. Its cost is not modeled.

Figures. *Host* figures are wall clock on this machine (compilation time is
reported apart and excluded from host tokens/s: each program's first call,
which builds the host program, counts as compilation). *Modeled* figures
follow a modeled clock that advances by each step program's
``cost_analysis()["time_s"]`` on the chosen chip (per device on a mesh),
with every request arriving at the clock value when it is submitted: time to
first token (TTFT) = first-token time - arrival; inter-token latency (ITL) =
the gap between consecutive tokens of a request (one step, which may carry
prefill chunks of other requests); modeled tokens/s = generated tokens /
modeled elapsed time. HBM = the weights (matmul weights in the policy's MX
format, packed) + the KV pool.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from models import transformer as tf
from models.paged_kv import DEFAULT_BLOCK_SIZE
from models.scheduler import Scheduler, Sequence
from mtia_jax import api, mx
from mtia_jax.precision import PrecisionPolicy, path_string
from runtime import power

__all__ = ["SamplingParams", "Request", "Result", "ServingStats", "ServingEngine", "sample",
           "weight_bytes", "kv_cache_bytes"]


# ------------------------------------------------------------ requests

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens: ``temperature`` 0 is greedy (argmax);
    otherwise softmax(logits / temperature) restricted to the ``top_k`` most
    likely tokens (0: all) and to the smallest set whose probability reaches
    ``top_p`` (1.0: all), drawn with a generator seeded by ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
                and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams: temperature must be a finite number >= 0, "
                             f"got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"SamplingParams: seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Request:
    """A prompt (1-D token ids) to continue by up to ``max_new_tokens`` tokens;
    ``eos_id`` (default: the engine's) ends it early."""

    prompt: Sequence[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    eos_id: int | None = None
    id: int | None = None  # assigned by ``ServingEngine.submit``


@dataclasses.dataclass
class Result:
    """A finished request: its generated ``tokens`` and modeled timings (seconds)."""

    id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str            # "eos" or "length"
    arrival_s: float              # modeled clock when submitted
    token_times_s: list[float]    # modeled clock at each generated token

    @property
    def ttft_s(self) -> float:
        """Modeled time to first token (queueing + prefill + insert)."""
        return self.token_times_s[0] - self.arrival_s

    @property
    def itl_s(self) -> list[float]:
        """Modeled inter-token latencies (one per token after the first)."""
        return list(np.diff(self.token_times_s))


class _Sequence(Sequence):
    """A request the engine holds: the scheduler's view of it (its prompt,
    then generated tokens, in ``token_ids``) and the modeled time of each
    token it generated."""

    def __init__(self, request: Request, rng: np.random.Generator, eos_id: int | None, arrival_s: float):
        super().__init__(request.id, len(request.prompt), request.prompt)
        self.request, self.rng, self.eos_id, self.arrival_s = request, rng, eos_id, arrival_s
        self.times: list[float] = []


# ------------------------------------------------------------ sampling

def sample(logits, params: SamplingParams, rng: np.random.Generator | None = None) -> int:
    """One token id from a logits vector (vocab,) under ``params`` (see
    ``SamplingParams``); ``rng`` is required unless sampling is greedy."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sample: logits must be a non-empty vector (vocab,), got shape {logits.shape}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sample: params must be a SamplingParams, got {type(params).__name__}")
    if params.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise ValueError("sample: a numpy Generator rng is required for temperature > 0")
    scaled = logits / params.temperature
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    kept = scaled[order]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        # the smallest prefix (most likely first) whose mass reaches top_p
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:cut], probs[:cut] / probs[:cut].sum()
    return int(order[rng.choice(len(order), p=probs)])


# ------------------------------------------------------------ HBM accounting

def _spec_divisor(spec, mesh) -> int:
    """How many ways a PartitionSpec splits an array on ``mesh`` (1 without a mesh)."""
    if mesh is None or spec is None:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    div = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            div *= sizes.get(axis, 1) if axis is not None else 1
    return div


def _is_matmul_weight(path: tuple) -> bool:
    """Parameters used as a matmul's weight operand: every matrix of the layers
    and ``lm_head`` (assumption: the embedding is a table lookup; the norms are vectors)."""
    names = [getattr(k, "key", None) for k in path]
    return names[-1] == "lm_head" or (names[0] == "layers" and names[-1] not in ("attn_norm", "mlp_norm"))


def _weight_format(precision: PrecisionPolicy | None, path: tuple) -> str | None:
    return precision.weight_format(path_string(path)) if precision is not None else None


def weight_bytes(params: dict, precision: PrecisionPolicy | None = None, pspecs=None, mesh=None) -> int:
    """HBM bytes of the weights on one device: MXArrays at their packed size;
    matmul weights (see ``_is_matmul_weight``) at the packed size of the MX
    format the policy gives them (``weights``, or the first of its ``rules``
    matching the parameter's path; blocks along the input axis); others at
    their dtype's size; each divided by its sharding on ``mesh``."""
    is_mx = lambda x: isinstance(x, mx.MXArray)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_mx)[0]
    specs = (jax.tree.leaves(pspecs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             if pspecs is not None else [None] * len(leaves))
    total = 0
    for (path, leaf), spec in zip(leaves, specs):
        if isinstance(leaf, mx.MXArray):
            nbytes = leaf.nbytes
        elif (fmt := _weight_format(precision, path)) is not None and _is_matmul_weight(path):
            nbytes = mx.MXType(fmt).nbytes(tuple(leaf.shape), axis=-2)
        else:
            nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        total += -(-nbytes // _spec_divisor(spec, mesh))
    return int(total)


def kv_cache_bytes(cache: dict, cspecs=None, mesh=None) -> int:
    """HBM bytes of a KV cache dict on one device (``k``, ``v``, ``lengths``)."""
    total = 0
    for name, leaf in cache.items():
        spec = cspecs[name] if cspecs is not None else None
        total += -(-leaf.size * leaf.dtype.itemsize // _spec_divisor(spec, mesh))
    return int(total)


# ------------------------------------------------------------ statistics

def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


@dataclasses.dataclass(frozen=True)
class ServingStats:
    """What the engine has done so far; ``modeled_*`` figures are on ``chip``
    (per device on a mesh), host figures are wall clock."""

    chip: str
    devices: int
    max_num_seqs: int
    requests: int
    generated_tokens: int
    steps: int
    computed_tokens: int          # tokens whose keys/values a step computed
    prefix_cached_tokens: int     # prompt tokens taken from the prefix cache instead
    preemptions: int
    host_wall_s: float
    host_compile_s: float
    modeled_time_s: float
    modeled_joules: float         # the step programs' energy over every device (runtime.power)
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    weights_bytes: int
    kv_cache_bytes: int
    num_blocks: int
    block_size: int
    peak_blocks: int              # most blocks held at once

    @property
    def host_tokens_per_s(self) -> float:
        run = self.host_wall_s - self.host_compile_s
        return self.generated_tokens / run if run > 0 else 0.0

    @property
    def modeled_tokens_per_s(self) -> float:
        return self.generated_tokens / self.modeled_time_s if self.modeled_time_s > 0 else 0.0

    @property
    def hbm_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def joules_per_token(self) -> float:
        """Modeled energy per generated token (the steps only: no idle time)."""
        return self.modeled_joules / self.generated_tokens if self.generated_tokens else 0.0

    def table(self) -> str:
        """An aligned summary, one figure per line."""
        where = f"{self.devices} x {self.chip}" if self.devices > 1 else self.chip
        per = " per device" if self.devices > 1 else ""
        ms = lambda s: f"{s * 1e3:.4g} ms"
        rows = [
            ("requests", f"{self.requests} ({self.generated_tokens} tokens generated in {self.steps} "
                         f"steps, at most {self.max_num_seqs} sequences per step)"),
            ("tokens/s", f"host {self.host_tokens_per_s:,.1f} (wall, excl. {self.host_compile_s:.2f} s "
                         f"compile) | modeled {self.modeled_tokens_per_s:,.1f} on {where}"),
            ("modeled time", ms(self.modeled_time_s)),
            ("energy (modeled)", f"{self.modeled_joules:.4g} J over every device, "
                                 f"{self.joules_per_token:.4g} J/token"),
            ("TTFT (modeled)", f"p50 {ms(self.ttft_p50_s)}  p99 {ms(self.ttft_p99_s)}"),
            ("ITL (modeled)", f"p50 {ms(self.itl_p50_s)}  p99 {ms(self.itl_p99_s)}"),
            ("KV blocks", f"{self.num_blocks} of {self.block_size} positions, at most {self.peak_blocks} "
                          f"held; {self.computed_tokens} tokens computed, {self.prefix_cached_tokens} "
                          f"from the prefix cache; {self.preemptions} preemptions"),
            ("HBM" + per, f"{self.hbm_bytes:,} B = weights {self.weights_bytes:,} B "
                          f"+ KV pool {self.kv_cache_bytes:,} B"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------ the engine

# compiled programs shared by every engine of the same model, chip, policy and
# mesh: (program name, cfg, chip, precision, mesh, input shapes) -> Compiled
_COMPILED: dict = {}


class _Program:
    """An ``mtia_jax.jit`` function whose compiled programs are kept per input
    shapes, so each call's modeled ``time_s`` is known."""

    def __init__(self, name: str, fun: Callable, engine: "ServingEngine", in_shardings=None,
                 donate_argnums=()):
        self.name, self.engine = name, engine
        self.jitted = api.jit(fun, chip=engine.chip, precision=engine.precision,
                              in_shardings=in_shardings, mesh=engine.mesh if in_shardings else None,
                              donate_argnums=donate_argnums)
        self.compiled: dict = {}
        self.calls: collections.Counter = collections.Counter()  # input shapes -> calls

    def _shared(self, key):
        e = self.engine
        return (self.name, e.cfg, self.jitted._resolve_chip().name, e.precision, e.mesh, key)

    def __call__(self, *args):
        key = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
        compiled = self.compiled.get(key) or _COMPILED.get(self._shared(key))
        if compiled is None:
            start = time.perf_counter()
            try:
                compiled = self.jitted.lower(*args).compile()
            except Exception as e:
                if self.engine.mesh is None:
                    raise
                raise ValueError(f"ServingEngine: the {self.name} program could not be sharded on "
                                 f"the mesh {dict(zip(self.engine.mesh.axis_names, self.engine.mesh.axis_sizes))}"
                                 f" with the model's shardings: {type(e).__name__}: {e}") from e
            self.compiled[key] = _COMPILED[self._shared(key)] = compiled
            out = compiled(*args)  # the host program is built at its first call: count it here
            jax.block_until_ready(out)
            self.engine._compile_s += time.perf_counter() - start
        else:
            self.compiled[key] = compiled
            out = compiled(*args)
        self.calls[key] += 1
        self.engine._clock += compiled.cost_analysis()["time_s"]
        self.engine._joules += power.energy(compiled.cost, compiled.chip).joules * self.engine.devices
        return out


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def _check_count(name: str, value, least: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise ValueError(f"ServingEngine: {name} must be an int >= {least}, got {value!r}")


class ServingEngine:
    """Continuous batching of ``models.transformer`` over a paged KV cache.

    Args:
      cfg, params: the model (params may hold MXArrays).
      max_num_seqs: the most sequences a step runs (default 8; vLLM's 256
        is for a real chip's HBM, this engine runs on the host).
      max_num_batched_tokens: the step's token budget (default 512).
      max_len: positions per sequence (default ``cfg.max_seq_len``); a
        request needs ``len(prompt) + max_new_tokens <= max_len``.
      block_size: positions per KV block (default 16, vLLM's).
      num_blocks: blocks in the pool (default: enough for ``max_num_seqs``
        sequences of ``max_len`` positions, so nothing is preempted; fewer
        blocks fit the same requests when they are shorter, and preempt
        when they are not). At least one ``max_len`` sequence must fit.
      chunked_prefill: split a prompt over steps to fit the token budget
        (default True); off, a prompt is scheduled whole and waits for a
        step with budget for all of it (then ``max_num_batched_tokens`` must
        be at least ``max_len``).
      prefix_caching: reuse the cached blocks of prompts that start alike
        (default True).
      chip: the modeled chip (``mtia_jax.chips`` name or ChipSpec).
      precision: an optional ``mtia_jax.PrecisionPolicy`` for every program.
      mesh: an optional ``mtia_jax.make_mesh`` mesh; the step is partitioned
        with ``models.transformer.pool_shardings`` and modeled per device.
      eos_id: the default end-of-sequence id (None: stop on length only).
      min_bucket: the fewest tokens a step program is compiled for.
    """

    def __init__(self, cfg: tf.Config, params: dict, *, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 512, max_len: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 chunked_prefill: bool = True, prefix_caching: bool = True, chip="mtia450",
                 precision: PrecisionPolicy | None = None, mesh=None, eos_id: int | None = None,
                 min_bucket: int = 8):
        if not isinstance(cfg, tf.Config):
            raise TypeError(f"ServingEngine: cfg must be a models.transformer.Config, got {type(cfg).__name__}")
        _check_count("max_num_seqs", max_num_seqs, 1)
        _check_count("max_num_batched_tokens", max_num_batched_tokens, 1)
        _check_count("block_size", block_size, 1)
        _check_count("min_bucket", min_bucket, 1)
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"ServingEngine: max_len must be an int in [2, cfg.max_seq_len = "
                             f"{cfg.max_seq_len}], got {max_len!r}")
        per_seq = -(-max_len // block_size)
        num_blocks = max_num_seqs * per_seq if num_blocks is None else num_blocks
        _check_count("num_blocks", num_blocks, 1)
        if num_blocks < per_seq:
            raise ValueError(f"ServingEngine: num_blocks = {num_blocks} cannot hold one sequence of "
                             f"max_len = {max_len} positions ({per_seq} blocks of {block_size}); "
                             f"raise num_blocks or lower max_len")
        if not chunked_prefill and max_num_batched_tokens < max_len:
            raise ValueError(f"ServingEngine: without chunked_prefill a prompt (or a preempted "
                             f"sequence) runs in one step, so max_num_batched_tokens = "
                             f"{max_num_batched_tokens} must be >= max_len = {max_len}")
        if precision is not None and not isinstance(precision, PrecisionPolicy):
            raise TypeError(f"ServingEngine: precision must be a PrecisionPolicy or None, got "
                            f"{type(precision).__name__}")
        if eos_id is not None and not 0 <= eos_id < cfg.vocab:
            raise ValueError(f"ServingEngine: eos_id must be in [0, vocab = {cfg.vocab}), got {eos_id!r}")
        expected = jax.tree.map(lambda s: tuple(s.shape), tf.param_shapes(cfg))
        got = jax.tree.map(lambda a: tuple(a.shape), params, is_leaf=lambda a: isinstance(a, mx.MXArray))
        if got != expected:
            raise ValueError(f"ServingEngine: params shapes {got} do not match the config's {expected}")
        self.cfg, self.params, self.max_len = cfg, params, max_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.chunked_prefill, self.prefix_caching = bool(chunked_prefill), bool(prefix_caching)
        self.chip, self.precision, self.mesh = chip, precision, mesh
        self.eos_id, self.min_bucket = eos_id, min_bucket

        self.scheduler = Scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   chunked_prefill=self.chunked_prefill, prefix_caching=self.prefix_caching)
        self.blocks = self.scheduler.blocks
        self.pool = tf.init_kv_pool(cfg, num_blocks, block_size)
        if mesh is not None:
            pspecs, pool_specs = tf.pool_shardings(cfg, mesh)
            step_sh = (pspecs, *(P(),) * 6, pool_specs)
            self.devices = math.prod(mesh.axis_sizes)
        else:
            pspecs = pool_specs = step_sh = None
            self.devices = 1
        # the pool is donated: a step writes its tokens' rows in place
        self._step = _Program("step", functools.partial(tf.paged_step, cfg), self, step_sh,
                              donate_argnums=(7,))
        self.weights_bytes = weight_bytes(params, precision, pspecs, mesh)
        self.kv_cache_bytes = kv_cache_bytes(self.pool, pool_specs, mesh)

        self._results: dict[int, Result] = {}
        self._next_id = 0
        self._clock = 0.0        # modeled seconds
        self._joules = 0.0       # modeled energy of the step programs, every device
        self._compile_s = 0.0    # host seconds spent compiling
        self._wall_s = 0.0       # host seconds inside step()
        self._steps = self._computed = 0

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    # ---------------------------------------------------------------- queue

    def submit(self, request: Request) -> int:
        """Queue a request (arriving now on the modeled clock); returns its id."""
        if not isinstance(request, Request):
            raise TypeError(f"ServingEngine.submit: expected a Request, got {type(request).__name__}")
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"ServingEngine.submit: prompt must be a non-empty 1-D sequence of token "
                             f"ids, got shape {prompt.shape} dtype {prompt.dtype}")
        if prompt.min() < 0 or prompt.max() >= self.cfg.vocab:
            raise ValueError(f"ServingEngine.submit: prompt ids must be in [0, vocab = {self.cfg.vocab}), "
                             f"got range [{prompt.min()}, {prompt.max()}]")
        n = request.max_new_tokens
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"ServingEngine.submit: max_new_tokens must be an int >= 1, got {n!r}")
        if prompt.size + n > self.max_len:
            raise ValueError(f"ServingEngine.submit: len(prompt) + max_new_tokens = {prompt.size} + {n} "
                             f"exceeds the engine's max_len = {self.max_len}")
        if not isinstance(request.sampling, SamplingParams):
            raise TypeError(f"ServingEngine.submit: sampling must be a SamplingParams, got "
                            f"{type(request.sampling).__name__}")
        if request.eos_id is not None and not 0 <= request.eos_id < self.cfg.vocab:
            raise ValueError(f"ServingEngine.submit: eos_id must be in [0, vocab = {self.cfg.vocab}), "
                             f"got {request.eos_id!r}")
        request = dataclasses.replace(request, prompt=[int(t) for t in prompt], id=self._next_id)
        self._next_id += 1
        eos = request.eos_id if request.eos_id is not None else self.eos_id
        self.scheduler.add(_Sequence(request, np.random.default_rng(request.sampling.seed), eos, self._clock))
        return request.id

    @property
    def pending(self) -> int:
        """Requests queued (or preempted), not running."""
        return len(self.scheduler.waiting)

    @property
    def active(self) -> int:
        """Requests running (holding KV blocks)."""
        return len(self.scheduler.running)

    @property
    def done(self) -> bool:
        return self.scheduler.done

    # ---------------------------------------------------------------- steps

    def _batch(self, scheduled: list[tuple[Sequence, int]]) -> tuple:
        """The step program's arguments for ``scheduled``, padded to buckets."""
        bs, nb = self.block_size, self.num_blocks
        total = sum(n for _, n in scheduled)
        n_pad = _pow2(total, self.min_bucket)
        b_pad = _pow2(len(scheduled))
        tables = [self.blocks.block_table(seq.id) for seq, _ in scheduled]
        w_pad = _pow2(max(len(t) for t in tables))
        tokens = np.zeros(n_pad, np.int32)
        positions = np.zeros(n_pad, np.int32)
        slots = np.full(n_pad, nb * bs, np.int32)     # padding tokens write nothing
        seq_ids = np.zeros(n_pad, np.int32)
        last = np.zeros(b_pad, np.int32)
        table = np.zeros((b_pad, w_pad), np.int32)
        at = 0
        for row, ((seq, n), blocks) in enumerate(zip(scheduled, tables)):
            pos = np.arange(seq.computed, seq.computed + n)
            tokens[at:at + n] = seq.token_ids[seq.computed:seq.computed + n]
            positions[at:at + n] = pos
            slots[at:at + n] = np.asarray(blocks)[pos // bs] * bs + pos % bs
            seq_ids[at:at + n] = row
            last[row] = at + n - 1
            table[row, :len(blocks)] = blocks
            at += n
        return tuple(jnp.asarray(a) for a in (tokens, positions, slots, seq_ids, table, last))

    def _emit(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token; a finished request frees its blocks and stores its Result."""
        seq.append(token)
        seq.times.append(self._clock)
        reason = ("eos" if seq.eos_id is not None and token == seq.eos_id else
                  "length" if len(seq.times) >= seq.request.max_new_tokens else None)
        if reason is not None:
            r = seq.request
            generated = seq.token_ids[len(r.prompt):]
            self._results[r.id] = Result(r.id, list(r.prompt), generated, reason, seq.arrival_s, seq.times)
            self.scheduler.finish(seq)

    def step(self) -> list[Result]:
        """Schedule, run one step program, sample; returns the requests that
        finished during the step."""
        start = time.perf_counter()
        before = set(self._results)
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if not self.done:
                raise RuntimeError("ServingEngine: no sequence could be scheduled; the pool or the "
                                   "token budget is too small for the queued requests")
            return []
        logits, self.pool = self._step(self.params, *self._batch(scheduled), self.pool)
        self._steps += 1
        self._computed += sum(n for _, n in scheduled)
        logits = np.asarray(logits)
        rows = {id(seq): row for row, (seq, _) in enumerate(scheduled)}
        for seq in self.scheduler.update(scheduled):
            self._emit(seq, sample(logits[rows[id(seq)]], seq.request.sampling, seq.rng))
        self._wall_s += time.perf_counter() - start
        return [self._results[i] for i in sorted(set(self._results) - before)]

    def run(self, on_finish: Callable[[Result], None] | None = None) -> list[Result]:
        """Step until every request has finished; returns every finished
        request in submission order. ``on_finish`` is called with each
        Result as it finishes (e.g. for progress)."""
        while not self.done:
            for result in self.step():
                if on_finish is not None:
                    on_finish(result)
        return [self._results[i] for i in sorted(self._results)]

    # ---------------------------------------------------------------- figures

    def stats(self) -> ServingStats:
        results = list(self._results.values())
        ttft = [r.ttft_s for r in results]
        itl = [x for r in results for x in r.itl_s]
        chip = self._step.jitted._resolve_chip().name
        return ServingStats(
            chip=chip, devices=self.devices, max_num_seqs=self.max_num_seqs, requests=len(results),
            generated_tokens=sum(len(r.tokens) for r in results), steps=self._steps,
            computed_tokens=self._computed, prefix_cached_tokens=self.scheduler.prefix_cached_tokens,
            preemptions=self.scheduler.preemptions, host_wall_s=self._wall_s, host_compile_s=self._compile_s,
            modeled_time_s=self._clock, modeled_joules=self._joules, ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99),
            itl_p50_s=_pct(itl, 50), itl_p99_s=_pct(itl, 99), weights_bytes=self.weights_bytes,
            kv_cache_bytes=self.kv_cache_bytes, num_blocks=self.num_blocks,
            block_size=self.block_size, peak_blocks=self.scheduler.peak_blocks)
