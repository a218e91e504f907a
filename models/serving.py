"""A serving engine for ``models.transformer``: a request queue and continuous
batching over a fixed number of KV-cache slots, compiled with ``mtia_jax.jit``.

    engine = ServingEngine(cfg, params, slots=4, chip="mtia450",
                           precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"))
    engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=16))
    engine.submit(Request(prompt=[4, 5], max_new_tokens=8,
                          sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7)))
    results = engine.run()          # list of Result, in submission order
    print(engine.stats().table())   # host and modeled tokens/s, TTFT, ITL p50/p99, HBM

How a step runs (``ServingEngine.step``):

1. *Admit.* While a slot is free and the queue is not empty, the next request
   is prefilled **alone** (batch 1, its prompt right-padded to a power-of-two
   bucket of at least ``min_bucket`` positions so few programs are compiled)
   into a batch-1 cache of the engine's capacity, and that cache is copied
   into the free slot of the batch cache by a compiled ``insert`` program
   (``lax.dynamic_update_slice`` along the batch axis). The cache layout is
   ``models.transformer``'s: ``k``/``v`` (L, slots, S, K, H). The first new
   token is sampled from the prefill's last-token logits.
2. *Decode.* One ``decode`` call runs every slot, each at its own position
   (``cache['lengths']``, tracked on the host; a free slot runs at position 0
   and its result is ignored: its rows are overwritten by the next insert).
3. *Retire.* A request finishes when it samples its EOS id (the EOS token is
   kept as its last token) or has ``max_new_tokens`` tokens; its slot is
   reused at the next admission.

Sampling runs on the host from the float32 logits, one ``numpy`` generator
per request seeded by ``SamplingParams.seed``, so a request's tokens do not
depend on which other requests share its batch. Its cost is not modeled.

Figures. *Host* figures are wall clock on this machine (compilation time is
reported apart and excluded from host tokens/s: each program's first call,
which builds the host program, counts as compilation). *Modeled* figures follow a
modeled clock that advances by each compiled call's
``cost_analysis()["time_s"]`` on the chosen chip (per device on a mesh), in
the order the engine issues them, with every request arriving at the clock
value when it is submitted: time to first token (TTFT) = first-token time -
arrival (queueing, its prefill and insert included); inter-token latency
(ITL) = the gap between consecutive tokens of a request (one decode step,
plus the prefills of requests admitted in between, which stall the batch);
modeled tokens/s = generated tokens / modeled elapsed time. HBM = the
weights (matmul weights in the policy's MX format, packed) + the KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import deque
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import transformer as tf
from mtia_jax import api, mx
from mtia_jax.precision import PrecisionPolicy

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


@dataclasses.dataclass
class _Active:
    request: Request
    rng: np.random.Generator
    eos_id: int | None
    arrival_s: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)


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


def weight_bytes(params: dict, precision: PrecisionPolicy | None = None, pspecs=None, mesh=None) -> int:
    """HBM bytes of the weights on one device: MXArrays at their packed size;
    with a policy that sets ``weights``, matmul weights (see ``_is_matmul_weight``)
    at that MX format's packed size (blocks along the input axis); others at
    their dtype's size; each divided by its sharding on ``mesh``."""
    fmt = mx.MXType(precision.weights) if precision is not None and precision.weights else None
    is_mx = lambda x: isinstance(x, mx.MXArray)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_mx)[0]
    specs = (jax.tree.leaves(pspecs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             if pspecs is not None else [None] * len(leaves))
    total = 0
    for (path, leaf), spec in zip(leaves, specs):
        if isinstance(leaf, mx.MXArray):
            nbytes = leaf.nbytes
        elif fmt is not None and _is_matmul_weight(path):
            nbytes = fmt.nbytes(tuple(leaf.shape), axis=-2)
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
    slots: int
    requests: int
    generated_tokens: int
    prefill_calls: int
    decode_steps: int
    host_wall_s: float
    host_compile_s: float
    modeled_time_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    weights_bytes: int
    kv_cache_bytes: int

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

    def table(self) -> str:
        """An aligned summary, one figure per line."""
        where = f"{self.devices} x {self.chip}" if self.devices > 1 else self.chip
        per = " per device" if self.devices > 1 else ""
        ms = lambda s: f"{s * 1e3:.4g} ms"
        rows = [
            ("requests", f"{self.requests} ({self.generated_tokens} tokens generated, "
                         f"{self.prefill_calls} prefills, {self.decode_steps} decode steps, "
                         f"{self.slots} slots)"),
            ("tokens/s", f"host {self.host_tokens_per_s:,.1f} (wall, excl. {self.host_compile_s:.2f} s "
                         f"compile) | modeled {self.modeled_tokens_per_s:,.1f} on {where}"),
            ("modeled time", ms(self.modeled_time_s)),
            ("TTFT (modeled)", f"p50 {ms(self.ttft_p50_s)}  p99 {ms(self.ttft_p99_s)}"),
            ("ITL (modeled)", f"p50 {ms(self.itl_p50_s)}  p99 {ms(self.itl_p99_s)}"),
            ("HBM" + per, f"{self.hbm_bytes:,} B = weights {self.weights_bytes:,} B "
                          f"+ KV cache {self.kv_cache_bytes:,} B"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------ the engine

def _insert(cache: dict, one: dict, slot):
    """``cache`` with batch-1 cache ``one``'s k/v written into batch row ``slot``."""
    start = (0, slot, 0, 0, 0)
    return {"k": lax.dynamic_update_slice(cache["k"], one["k"].astype(cache["k"].dtype), start),
            "v": lax.dynamic_update_slice(cache["v"], one["v"].astype(cache["v"].dtype), start),
            "lengths": cache["lengths"]}


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

    def __call__(self, *args):
        key = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
        compiled = self.compiled.get(key)
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
            self.compiled[key] = compiled
            out = compiled(*args)  # the host program is built at its first call: count it here
            jax.block_until_ready(out)
            self.engine._compile_s += time.perf_counter() - start
        else:
            out = compiled(*args)
        self.engine._clock += compiled.cost_analysis()["time_s"]
        return out


class ServingEngine:
    """Continuous batching of ``models.transformer`` over ``slots`` KV-cache slots.

    Args:
      cfg, params: the model (params may hold MXArrays).
      slots: how many requests decode together (the decode batch).
      max_len: KV-cache positions per slot (default ``cfg.max_seq_len``); a
        request needs ``len(prompt) + max_new_tokens <= max_len``.
      chip: the modeled chip (``mtia_jax.chips`` name or ChipSpec).
      precision: an optional ``mtia_jax.PrecisionPolicy`` for every program.
      mesh: an optional ``mtia_jax.make_mesh`` mesh; programs are partitioned
        with ``models.transformer.shardings`` and modeled per device.
      eos_id: the default end-of-sequence id (None: stop on length only).
      min_bucket: the smallest padded prompt length of a prefill.
    """

    def __init__(self, cfg: tf.Config, params: dict, *, slots: int = 4, max_len: int | None = None,
                 chip="mtia450", precision: PrecisionPolicy | None = None, mesh=None,
                 eos_id: int | None = None, min_bucket: int = 8):
        if not isinstance(cfg, tf.Config):
            raise TypeError(f"ServingEngine: cfg must be a models.transformer.Config, got {type(cfg).__name__}")
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"ServingEngine: slots must be an int >= 1, got {slots!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"ServingEngine: max_len must be an int in [2, cfg.max_seq_len = "
                             f"{cfg.max_seq_len}], got {max_len!r}")
        if precision is not None and not isinstance(precision, PrecisionPolicy):
            raise TypeError(f"ServingEngine: precision must be a PrecisionPolicy or None, got "
                            f"{type(precision).__name__}")
        if eos_id is not None and not 0 <= eos_id < cfg.vocab:
            raise ValueError(f"ServingEngine: eos_id must be in [0, vocab = {cfg.vocab}), got {eos_id!r}")
        if not isinstance(min_bucket, int) or min_bucket < 1:
            raise ValueError(f"ServingEngine: min_bucket must be an int >= 1, got {min_bucket!r}")
        expected = jax.tree.map(lambda s: tuple(s.shape), tf.param_shapes(cfg))
        got = jax.tree.map(lambda a: tuple(a.shape), params, is_leaf=lambda a: isinstance(a, mx.MXArray))
        if got != expected:
            raise ValueError(f"ServingEngine: params shapes {got} do not match the config's {expected}")
        self.cfg, self.params, self.slots, self.max_len = cfg, params, slots, max_len
        self.chip, self.precision, self.mesh = chip, precision, mesh
        self.eos_id, self.min_bucket = eos_id, min_bucket

        self.cache = tf.init_cache(cfg, slots, max_len)
        self._empty_one = tf.init_cache(cfg, 1, max_len)
        if mesh is not None:
            pspecs, cspecs, tspec = tf.shardings(cfg, mesh, slots)
            pspecs1, cspecs1, tspec1 = tf.shardings(cfg, mesh, 1)
            pre_sh, dec_sh = (pspecs1, tspec1, None, cspecs1), (pspecs, tspec, cspecs)
            ins_sh = (cspecs, cspecs1, None)
            self.devices = math.prod(mesh.axis_sizes)
        else:
            pspecs = cspecs = pre_sh = dec_sh = ins_sh = None
            self.devices = 1
        self._prefill = _Program("prefill", functools.partial(tf.prefill, cfg), self, pre_sh)
        # the KV cache is donated: decode writes each step's rows and insert a
        # prefilled sequence in place, as a serving engine's cache does
        self._decode = _Program("decode", functools.partial(tf.decode, cfg), self, dec_sh,
                                donate_argnums=(2,))
        self._insert = _Program("insert", _insert, self, ins_sh, donate_argnums=(0,))
        self.weights_bytes = weight_bytes(params, precision, pspecs, mesh)
        self.kv_cache_bytes = kv_cache_bytes(self.cache, cspecs, mesh)

        self._queue: deque[tuple[Request, float]] = deque()
        self._active: list[_Active | None] = [None] * slots
        self._positions = np.zeros(slots, np.int32)  # valid cache positions per slot (host copy)
        self._results: dict[int, Result] = {}
        self._next_id = 0
        self._clock = 0.0        # modeled seconds
        self._compile_s = 0.0    # host seconds spent compiling
        self._wall_s = 0.0       # host seconds inside step()
        self._prefills = self._decodes = 0

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
                             f"exceeds the cache capacity max_len = {self.max_len}")
        if not isinstance(request.sampling, SamplingParams):
            raise TypeError(f"ServingEngine.submit: sampling must be a SamplingParams, got "
                            f"{type(request.sampling).__name__}")
        if request.eos_id is not None and not 0 <= request.eos_id < self.cfg.vocab:
            raise ValueError(f"ServingEngine.submit: eos_id must be in [0, vocab = {self.cfg.vocab}), "
                             f"got {request.eos_id!r}")
        request = dataclasses.replace(request, prompt=[int(t) for t in prompt], id=self._next_id)
        self._next_id += 1
        self._queue.append((request, self._clock))
        return request.id

    @property
    def pending(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return sum(a is not None for a in self._active)

    @property
    def done(self) -> bool:
        return not self._queue and not self.active

    # ---------------------------------------------------------------- steps

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, 1 << (n - 1).bit_length()))

    def _emit(self, slot_or_none, state: _Active, logits) -> bool:
        """Sample and record a token; True (and the Result stored) if the request finished."""
        token = sample(logits, state.request.sampling, state.rng)
        state.tokens.append(token)
        state.times.append(self._clock)
        reason = ("eos" if state.eos_id is not None and token == state.eos_id else
                  "length" if len(state.tokens) >= state.request.max_new_tokens else None)
        if reason is None:
            return False
        r = state.request
        self._results[r.id] = Result(r.id, list(r.prompt), state.tokens, reason, state.arrival_s, state.times)
        if slot_or_none is not None:
            self._active[slot_or_none] = None
            self._positions[slot_or_none] = 0
        return True

    def _admit(self, slot: int) -> None:
        request, arrival = self._queue.popleft()
        n = len(request.prompt)
        padded = np.zeros((1, self._bucket(n)), np.int32)
        padded[0, :n] = request.prompt
        lengths = jnp.array([n], jnp.int32)
        logits, one = self._prefill(self.params, jnp.asarray(padded), lengths, self._empty_one)
        self._prefills += 1
        eos = request.eos_id if request.eos_id is not None else self.eos_id
        state = _Active(request, np.random.default_rng(request.sampling.seed), eos, arrival)
        first = np.asarray(logits)[0, n - 1]  # the last prompt position's logits
        self.cache = self._insert(self.cache, one, jnp.int32(slot))
        if not self._emit(None, state, first):
            self._active[slot] = state
            self._positions[slot] = n

    def step(self) -> list[Result]:
        """Admit queued requests into free slots, then one decode step of the
        active batch; returns the requests that finished during the step."""
        start = time.perf_counter()
        before = set(self._results)
        for slot in range(self.slots):
            while self._active[slot] is None and self._queue:
                self._admit(slot)  # a request finished by its first token frees the slot again
        if self.active:
            tokens = np.array([a.tokens[-1] if a is not None else 0 for a in self._active], np.int32)
            cache = {"k": self.cache["k"], "v": self.cache["v"],
                     "lengths": jnp.asarray(self._positions)}
            logits, cache = self._decode(self.params, jnp.asarray(tokens), cache)
            self._decodes += 1
            self.cache = cache
            logits = np.asarray(logits)
            for slot, state in enumerate(self._active):
                if state is not None:
                    self._positions[slot] += 1
                    self._emit(slot, state, logits[slot])
        self._wall_s += time.perf_counter() - start
        return [self._results[i] for i in sorted(set(self._results) - before)]

    def run(self, on_finish: Callable[[Result], None] | None = None) -> list[Result]:
        """Step until the queue is empty and every slot is free; returns every
        finished request in submission order. ``on_finish`` is called with each
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
        chip = self._decode.jitted._resolve_chip().name
        return ServingStats(
            chip=chip, devices=self.devices, slots=self.slots, requests=len(results),
            generated_tokens=sum(len(r.tokens) for r in results), prefill_calls=self._prefills,
            decode_steps=self._decodes, host_wall_s=self._wall_s, host_compile_s=self._compile_s,
            modeled_time_s=self._clock, ttft_p50_s=_pct(ttft, 50), ttft_p99_s=_pct(ttft, 99),
            itl_p50_s=_pct(itl, 50), itl_p99_s=_pct(itl, 99), weights_bytes=self.weights_bytes,
            kv_cache_bytes=self.kv_cache_bytes)
