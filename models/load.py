"""Serving load and its latency metrics, as ``vllm/benchmarks/benchmark_serving``
reports them.

Load: requests arriving by a Poisson process at ``rate`` requests/s
(exponential gaps), all at once (a burst), or from a JSONL trace of
``{"arrival_s", "prompt_len", "output_len"}`` lines, optionally with shared
prompt prefixes (``with_shared_prefix``, a system prompt); prompt and output
lengths drawn from a stated distribution (``Uniform``, ``Fixed``). Every draw
comes from one ``numpy`` generator seeded by ``seed``, so a load is
reproducible.

Metrics, per finished request, on whatever clock produced its token times
(the modeled clock for mtia-jax's engines):

- TTFT: first token time - arrival;
- TPOT: (last token time - first token time) / (output tokens - 1), the mean
  time per output token after the first (undefined for one token);
- ITL: every gap between consecutive tokens;
- E2E: last token time - arrival;

summarized as mean and p50/p90/p99 (``numpy.percentile``, linear
interpolation), plus throughput (output tokens / makespan, from the first
arrival to the last token) and goodput: finished requests per second that
meet an SLO (e.g. TTFT <= 500 ms and TPOT <= 50 ms).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Fixed:
    value: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Integers uniform in [low, high], both included."""

    low: int
    high: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"Uniform: need 1 <= low <= high, got {self.low}, {self.high}")
        return rng.integers(self.low, self.high + 1, size=n)


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """A request of a load. Its prompt's first ``prefix_len`` tokens are the
    shared prefix ``prefix_id`` (a system prompt, say): requests with the
    same ``prefix_id`` start with the same tokens, which a prefix cache can
    serve once (``prefix_id`` None: nothing shared)."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_id: int | None = None
    prefix_len: int = 0

    def __post_init__(self):
        if self.prefix_len < 0 or self.prefix_len > self.prompt_len or (self.prefix_len and self.prefix_id is None):
            raise ValueError(f"LoadRequest: need 0 <= prefix_len <= prompt_len and a prefix_id for a "
                             f"prefix, got prefix_id={self.prefix_id}, prefix_len={self.prefix_len}, "
                             f"prompt_len={self.prompt_len}")


def with_shared_prefix(requests: Sequence[LoadRequest], prefix_len: int, groups: int = 1, *,
                       seed: int = 0) -> list[LoadRequest]:
    """``requests`` with one of ``groups`` shared prefixes of ``prefix_len``
    tokens (drawn uniformly per request, seeded) put in front of each prompt:
    the prompt grows by ``prefix_len`` tokens, as a system prompt adds them."""
    if prefix_len < 1 or groups < 1:
        raise ValueError(f"with_shared_prefix: need prefix_len >= 1 and groups >= 1, got {prefix_len}, {groups}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, groups, size=len(requests))
    return [dataclasses.replace(r, prompt_len=r.prompt_len + prefix_len, prefix_id=int(g), prefix_len=prefix_len)
            for r, g in zip(requests, ids)]


def poisson(rate: float, n: int, prompt=Uniform(128, 1024), output=Uniform(64, 512), *,
            seed: int = 0) -> list[LoadRequest]:
    """``n`` requests arriving by a Poisson process of ``rate`` requests/s
    (``rate=inf``: all at time 0, a burst)."""
    if rate <= 0 or n < 0:
        raise ValueError(f"poisson: need rate > 0 and n >= 0, got {rate}, {n}")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n) if np.isinf(rate) else rng.exponential(1.0 / rate, size=n)
    arrivals = np.cumsum(gaps) - (gaps[0] if n else 0.0)  # the first request at time 0
    prompts, outputs = prompt.sample(rng, n), output.sample(rng, n)
    return [LoadRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def read_trace(path: str | Path) -> list[LoadRequest]:
    """Requests from a JSONL trace, one ``{"arrival_s", "prompt_len",
    "output_len"}`` object per line (optionally ``"prefix_id"`` and
    ``"prefix_len"``: the shared prompt prefix it starts with), sorted by
    arrival."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prefix_id = item.get("prefix_id")
            request = LoadRequest(float(item["arrival_s"]), int(item["prompt_len"]), int(item["output_len"]),
                                  None if prefix_id is None else int(prefix_id), int(item.get("prefix_len", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: expected a JSON object with arrival_s, prompt_len and "
                             f"output_len, and optionally prefix_id and prefix_len ({error})") from None
        if request.arrival_s < 0 or request.prompt_len < 1 or request.output_len < 1:
            raise ValueError(f"{path}:{number}: arrival_s must be >= 0 and the lengths >= 1, got {item}")
        requests.append(request)
    return sorted(requests, key=lambda r: r.arrival_s)


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_s: float = 0.5
    tpot_s: float = 0.05

    def met(self, ttft: float, tpot: float | None) -> bool:
        return ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


@dataclasses.dataclass(frozen=True)
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Percentiles":
        if not len(values):
            return cls(*(float("nan"),) * 4)
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), *(float(np.percentile(v, q)) for q in (50, 90, 99)))


@dataclasses.dataclass(frozen=True)
class Metrics:
    requests: int
    output_tokens: int
    makespan_s: float
    ttft: Percentiles
    tpot: Percentiles
    itl: Percentiles
    e2e: Percentiles
    slo: SLO
    meeting_slo: int

    @property
    def throughput(self) -> float:
        """Output tokens per second over the makespan."""
        return self.output_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def goodput(self) -> float:
        """Requests per second that meet the SLO."""
        return self.meeting_slo / self.makespan_s if self.makespan_s > 0 else 0.0

    def summary(self) -> str:
        """The metrics as text (times in ms)."""
        lines = [f"{self.requests} requests, {self.output_tokens} output tokens in {self.makespan_s:.3f} s: "
                 f"{self.throughput:,.0f} tokens/s, goodput {self.goodput:.2f} requests/s "
                 f"({self.meeting_slo} meet TTFT <= {self.slo.ttft_s * 1e3:g} ms and TPOT <= "
                 f"{self.slo.tpot_s * 1e3:g} ms)"]
        for name in ("ttft", "tpot", "itl", "e2e"):
            p = getattr(self, name)
            lines.append(f"  {name.upper():<4} mean {p.mean * 1e3:9.2f}  p50 {p.p50 * 1e3:9.2f}  "
                         f"p90 {p.p90 * 1e3:9.2f}  p99 {p.p99 * 1e3:9.2f} ms")
        return "\n".join(lines)

    def row(self) -> dict:
        return {"requests": self.requests, "throughput_tok_s": self.throughput, "goodput_req_s": self.goodput,
                **{f"{name}_{q}_ms": getattr(getattr(self, name), q) * 1e3
                   for name in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p90", "p99")}}


def metrics(arrivals: Sequence[float], token_times: Sequence[Sequence[float]], slo: SLO = SLO()) -> Metrics:
    """Latency metrics of finished requests: ``arrivals[i]`` and the times of
    request i's output tokens, in order."""
    if len(arrivals) != len(token_times):
        raise ValueError(f"metrics: {len(arrivals)} arrivals but {len(token_times)} token lists")
    ttft, tpot, itl, e2e, good = [], [], [], [], 0
    for arrival, times in zip(arrivals, token_times):
        if not len(times):
            raise ValueError("metrics: a finished request has at least one token")
        times = np.asarray(times, dtype=np.float64)
        if np.any(np.diff(times) < 0) or times[0] < arrival:
            raise ValueError("metrics: token times must not decrease nor precede the arrival")
        first = times[0] - arrival
        per_token = float((times[-1] - times[0]) / (len(times) - 1)) if len(times) > 1 else None
        ttft.append(first)
        e2e.append(times[-1] - arrival)
        itl.extend(np.diff(times))
        if per_token is not None:
            tpot.append(per_token)
        good += slo.met(first, per_token)
    start = min(arrivals, default=0.0)
    end = max((t[-1] for t in token_times), default=start)
    return Metrics(len(arrivals), sum(len(t) for t in token_times), float(end - start),
                   Percentiles.of(ttft), Percentiles.of(tpot), Percentiles.of(itl), Percentiles.of(e2e),
                   slo, int(good))


__all__ = ["Fixed", "Uniform", "LoadRequest", "poisson", "read_trace", "SLO", "Percentiles", "Metrics",
           "metrics"]
