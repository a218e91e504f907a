"""Collective algorithms and their alpha-beta times on a chip's network.

A collective over a group of p devices runs an *algorithm*: a sequence of
steps in which every device sends messages to others. On a fabric with
bandwidth B per device (unidirectional, over all its links, times
``ChipSpec.collective_efficiency``), a message flight time alpha
(``scaleup_link_latency_s``: one switch hop), a per-message issue time o
(``scaleup_message_s``) and L links (a device issues up to L messages at
once), one step in which a device sends m messages of b bytes in all takes

    step(m, b) = alpha + ceil(m / L) o + b / B

and an algorithm's time is the sum of its steps (LogGP-style; Thakur,
Rabenseifner and Gropp, "Optimization of Collective Communication
Operations in MPICH", IJHPCA 2005, for the ring, recursive-doubling and
halving-doubling schedules). With N the bytes of the per-device buffer
(``all_gather``: the gathered result; the others: the operand; an
``all_to_all`` carrying ``payload_bytes``: that payload):

| kind           | algorithm          | time                                            | fabric   |
|----------------|--------------------|-------------------------------------------------|----------|
| all_reduce     | ring               | 2 (p-1) step(1, N/p)                            | any      |
|                | halving_doubling   | 2 log2 q step(1, -) + 2 (q-1)/q N/B, q the      | any      |
|                |                    |   largest power of 2 <= p (+ 2 step(1, N) to    |          |
|                |                    |   fold the p - q others in and out)             |          |
|                | one_shot           | step(p-1, (p-1) N)                              | switched |
|                | two_shot           | 2 step(p-1, (p-1)/p N)                          | switched |
| all_gather,    | ring               | (p-1) step(1, N/p)                              | any      |
| reduce_scatter | recursive_doubling | ceil(log2 p) step(1, -) + (p-1)/p N/B           | any      |
|                | direct             | step(p-1, (p-1)/p N)                            | switched |
| all_to_all     | pairwise           | (p-1) step(1, N/p)                              | any      |
|                | direct             | step(p-1, (p-1)/p N)                            | switched |
| permute        | point_to_point     | step(1, N)                                      | any      |

On a switched fabric every device is one hop from every other, so a
device sends to many at once (the direct, one-shot and two-shot schedules,
and an all-to-all as one exchange); on a ring fabric messages to
non-neighbours are forwarded, so only the neighbour schedules apply. The
fastest applicable algorithm is chosen per collective, message size and
fabric, as NCCL's and HCCL's tuners do.

A collective whose group spans scale-up domains (a mesh axis marked
``scale_out_axes`` in ``mtia_jax.make_mesh``: ``attrs["scale_out_group"]``
devices in different domains, ``group / scale_out_group`` within each) runs
hierarchically, with the same formulas on each fabric (the scale-out one
with ``scaleout_bandwidth``, ``scaleout_latency_s``, one link):

- all_reduce: reduce_scatter inside the domain, all_reduce of the 1/p_in
  shard across domains, all_gather inside;
- all_gather: all_gather of the 1/p_in shard across domains, then inside;
- reduce_scatter: inside, then across domains on the 1/p_in shard;
- all_to_all: one exchange on both fabrics at once (the slower one counts);
- permute: on the fabric its pairs cross.

``plan(op, chip)`` returns the phases; ``lowering.passes.collective_algorithms``
records the choice on each op (``attrs["algorithm"]``, shown by
``as_text()``) and ``runtime.collectives`` turns the phases into a kernel's
time, bytes sent and HBM traffic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

REDUCING = frozenset({"all_reduce", "reduce_scatter"})


@dataclasses.dataclass(frozen=True)
class Fabric:
    """One level of the network as the collective formulas see it."""

    name: str           # "scale-up" or "scale-out"
    bandwidth: float    # B: bytes/s a device sends (and receives), all links, achievable
    hop_s: float        # alpha: a message's flight time
    message_s: float    # o: issuing one message
    links: int          # L: messages a device issues at once
    switched: bool

    def step(self, messages: int, nbytes: float) -> float:
        """One step in which a device sends ``messages`` messages of ``nbytes`` in all."""
        return self.hop_s + math.ceil(messages / self.links) * self.message_s + nbytes / self.bandwidth


def scale_up(chip) -> Fabric:
    return Fabric("scale-up", chip.scaleup_link_bandwidth * chip.collective_efficiency,
                  chip.scaleup_link_latency_s, chip.scaleup_message_s, chip.scaleup_links,
                  chip.scaleup_topology == "switched")


def scale_out(chip) -> Fabric:
    return Fabric("scale-out", chip.scaleout_bandwidth * chip.collective_efficiency,
                  chip.scaleout_latency_s, chip.scaleup_message_s, 1, True)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One collective run on one fabric: per device, the bytes it sends (and
    receives) and, of those it receives, the bytes it reduces into its own."""

    kind: str
    algorithm: str
    fabric: str
    group: int
    nbytes: float       # N, the per-device buffer of this phase
    time_s: float
    sent_bytes: float
    reduced_bytes: float
    concurrent: bool = False  # runs at the same time as the phase before it

    def __str__(self) -> str:
        where = "" if self.fabric == "scale-up" else f", {self.fabric}"
        return f"{self.kind}:{self.algorithm}({self.group}{where})"


# an algorithm: (p, N, fabric) -> (seconds, bytes sent per device, bytes reduced per device)
Algorithm = Callable[[int, float, Fabric], tuple[float, float, float]]


def _log2(p: int) -> int:
    return math.ceil(math.log2(p))


def _ring_all_reduce(p, n, f):
    return 2 * (p - 1) * f.step(1, n / p), 2 * (p - 1) / p * n, (p - 1) / p * n


def _halving_doubling_all_reduce(p, n, f):
    # Rabenseifner: on the largest power of two q <= p; the p - q extra
    # devices fold their buffers in before and get the result after
    q = 1 << (p.bit_length() - 1)
    steps = 2 * (q.bit_length() - 1)
    time = steps * f.step(1, 0.0) + 2 * (q - 1) / q * n / f.bandwidth
    sent = 2 * (q - 1) / q * n
    if q != p:
        time += 2 * f.step(1, n)
        sent += n
    return time, sent, (q - 1) / q * n + (n if q != p else 0.0)


def _one_shot_all_reduce(p, n, f):
    return f.step(p - 1, (p - 1) * n), (p - 1) * n, (p - 1) * n


def _two_shot_all_reduce(p, n, f):
    share = (p - 1) / p * n
    return 2 * f.step(p - 1, share), 2 * share, share


def _ring_shares(reducing: bool) -> Algorithm:
    def ring(p, n, f):
        share = (p - 1) / p * n
        return (p - 1) * f.step(1, n / p), share, share if reducing else 0.0
    return ring


def _recursive_doubling(reducing: bool) -> Algorithm:
    def recursive(p, n, f):
        share = (p - 1) / p * n
        return _log2(p) * f.step(1, 0.0) + share / f.bandwidth, share, share if reducing else 0.0
    return recursive


def _direct(reducing: bool) -> Algorithm:
    def direct(p, n, f):
        share = (p - 1) / p * n
        return f.step(p - 1, share), share, share if reducing else 0.0
    return direct


def _point_to_point(p, n, f):
    return f.step(1, n), n, 0.0


# kind -> algorithm name -> formula
ALGORITHMS: dict[str, dict[str, Algorithm]] = {
    "all_reduce": {"ring": _ring_all_reduce, "halving_doubling": _halving_doubling_all_reduce,
                   "one_shot": _one_shot_all_reduce, "two_shot": _two_shot_all_reduce},
    "all_gather": {"ring": _ring_shares(False), "recursive_doubling": _recursive_doubling(False),
                   "direct": _direct(False)},
    "reduce_scatter": {"ring": _ring_shares(True), "recursive_doubling": _recursive_doubling(True),
                       "direct": _direct(True)},
    "all_to_all": {"pairwise": _ring_shares(False), "direct": _direct(False)},
    "permute": {"point_to_point": _point_to_point},
}
# algorithms that send to many devices at once: one hop to each on a switched fabric only
SWITCHED_ONLY = frozenset({"one_shot", "two_shot", "direct"})


def applicable(kind: str, fabric: Fabric) -> dict[str, Algorithm]:
    return {name: rule for name, rule in ALGORITHMS[kind].items()
            if fabric.switched or name not in SWITCHED_ONLY}


def phase(kind: str, p: int, nbytes: float, fabric: Fabric, algorithm: str | None = None) -> Phase:
    """The fastest applicable algorithm for one collective (or ``algorithm``)."""
    options = applicable(kind, fabric)
    if algorithm is not None and algorithm not in options:
        raise ValueError(f"{kind}: algorithm {algorithm!r} does not run on a "
                         f"{'switched' if fabric.switched else 'ring'} {fabric.name} fabric; "
                         f"choose one of {sorted(options)}")
    names = [algorithm] if algorithm is not None else list(options)
    costs = {name: options[name](p, nbytes, fabric) for name in names}
    best = min(costs, key=lambda name: costs[name][0])
    time, sent, reduced = costs[best]
    return Phase(kind, best, fabric.name, p, nbytes, time, sent, reduced)


def buffer_bytes(op) -> float:
    """N: the per-device buffer a collective op moves (all its operands: a
    combined collective moves them together)."""
    if op.kind == "all_gather":
        return float(sum(r.type.nbytes for r in op.results))
    if "payload_bytes" in op.attrs:
        return float(op.attrs["payload_bytes"])
    return float(sum(v.type.nbytes for v in op.operands))


def plan(op, chip) -> tuple[Phase, ...]:
    """The phases of collective ``op`` on ``chip``: one on the fabric its
    group lives on, or (a group across scale-up domains) one per level."""
    p = int(op.attrs.get("group", 1))
    if p <= 1:
        return ()
    n, kind = buffer_bytes(op), op.kind
    outer = int(op.attrs.get("scale_out_group", 1))
    inner = p // outer
    if outer == 1:
        return (phase(kind, p, n, scale_up(chip)),)
    if inner == 1:
        return (phase(kind, p, n, scale_out(chip)),)
    up, out = scale_up(chip), scale_out(chip)
    if kind == "all_reduce":
        return (phase("reduce_scatter", inner, n, up), phase("all_reduce", outer, n / inner, out),
                phase("all_gather", inner, n, up))
    if kind == "all_gather":
        return (phase("all_gather", outer, n / inner, out), phase("all_gather", inner, n, up))
    if kind == "reduce_scatter":
        return (phase("reduce_scatter", inner, n, up), phase("reduce_scatter", outer, n / inner, out))
    if kind == "all_to_all":
        # one exchange: the shares for the p - p_in devices of other domains
        # cross scale-out while those for the domain's own cross scale-up
        remote_bytes = (outer - 1) / outer * n
        remote = Phase(kind, "direct", out.name, p, n, out.step(p - inner, remote_bytes), remote_bytes, 0.0)
        local = dataclasses.replace(phase(kind, inner, n / outer, up), concurrent=True)
        return (remote, local)
    return (phase(kind, p, n, out),)  # a permute whose pairs cross domains


def elapsed(phases: tuple[Phase, ...]) -> float:
    """A plan's time: phases one after another, a concurrent phase alongside
    the one before it (the slower of the two counts)."""
    total, running = 0.0, 0.0
    for ph in phases:
        if ph.concurrent:
            running = max(running, ph.time_s)
        else:
            total, running = total + running, ph.time_s
    return total + running


def describe(phases: tuple[Phase, ...]) -> str:
    """The algorithm as ``as_text()`` and the profile show it."""
    if not phases:
        return "local"  # a group of one device
    if len(phases) == 1:
        only = phases[0]
        return only.algorithm if only.fabric == "scale-up" else f"{only.algorithm}@scale-out"
    steps = "".join((" | " if ph.concurrent else " + ") + str(ph) for ph in phases)[3:]
    return "hierarchical[" + steps + "]"
