"""HBM liveness: which buffers are alive when, and the program's peak.

Buffers are the program's parameters, its non-scalar constants and the
results of kernels. A view op (reshape, squeeze, ...) aliases its operand's
buffer, and an elementwise kernel writes its result in place over an
operand buffer of the same size that is not needed afterwards. Parameters stay alive for the whole call (the caller owns them)
unless donated, in which case they die after their last use like any
intermediate. Outputs stay alive to the end.

The plan also reports the totals ``jax.stages.Compiled.memory_analysis()``
reports, under the same names: argument, output, temporary and aliased
(donated) bytes, and the peak.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowering.ir import Module, Value
from runtime.cost_model import category


@dataclasses.dataclass(frozen=True)
class Buffer:
    what: str
    nbytes: int
    source: Any
    start: int  # index of the op that defines it (-1: before the program)
    end: int    # index of the last op that uses it (len(ops): to the end)
    # "argument" (a parameter's buffer), "output" (holds a program output),
    # or "temp" (intermediates, non-scalar constants, region scratch)
    role: str = "temp"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    buffers: tuple[Buffer, ...]
    peak_bytes: int
    peak_at: int
    argument_bytes: int = 0  # all parameters, donated or not
    output_bytes: int = 0    # all outputs (each distinct output value once)
    temp_bytes: int = 0      # peak of the live temp buffers
    alias_bytes: int = 0     # donated parameters (their buffers may be reused)

    def largest(self, n: int = 5) -> list[Buffer]:
        return sorted(self.buffers, key=lambda b: -b.nbytes)[:n]

    def live_at_peak(self, n: int = 5) -> list[Buffer]:
        """The ``n`` largest buffers alive when the program needs the most HBM."""
        live = [b for b in self.buffers if b.start <= self.peak_at <= b.end]
        return sorted(live, key=lambda b: -b.nbytes)[:n]

    # the names of jax's ``CompiledMemoryStats``
    @property
    def argument_size_in_bytes(self) -> int:
        return self.argument_bytes

    @property
    def output_size_in_bytes(self) -> int:
        return self.output_bytes

    @property
    def temp_size_in_bytes(self) -> int:
        return self.temp_bytes

    @property
    def alias_size_in_bytes(self) -> int:
        return self.alias_bytes

    @property
    def peak_memory_in_bytes(self) -> int:
        return self.peak_bytes

    @property
    def generated_code_size_in_bytes(self) -> int:
        return 0  # not modeled

    def __str__(self) -> str:
        mib = 2.0 ** 20
        return (f"MemoryPlan(peak {self.peak_bytes / mib:.3f} MiB; arguments "
                f"{self.argument_bytes / mib:.3f} MiB, outputs {self.output_bytes / mib:.3f} MiB, "
                f"temp {self.temp_bytes / mib:.3f} MiB, aliased {self.alias_bytes / mib:.3f} MiB)")


def _in_place(op) -> bool:
    """Kernels that may write their result over an operand that dies with them."""
    kind = category(op)
    return kind in ("elementwise", "transcendental") or op.attrs.get("in_place", False) or (
        kind == "fused" and op.attrs.get("pattern") == "elementwise")


def plan_memory(module: Module, donated: frozenset[int] = frozenset()) -> MemoryPlan:
    n_ops = len(module.ops)
    last_use: dict[Value, int] = {}
    for index, op in enumerate(module.ops):
        for v in op.operands:
            last_use[v] = index
    for v in module.outputs:
        last_use[v] = n_ops
    for i, p in enumerate(module.params):
        if i not in donated:
            last_use[p] = n_ops

    owner: dict[Value, Value] = {}  # value -> the value whose buffer it uses
    end: dict[Value, int] = {}       # buffer -> last step it is needed
    defined_at: dict[Value, int] = {}
    described: dict[Value, tuple[str, Any]] = {}

    def new_buffer(v: Value, start: int, what: str, source) -> None:
        owner[v] = v
        defined_at[v] = start
        end[v] = last_use.get(v, start)
        described[v] = (what, source)

    for i, p in enumerate(module.params):
        new_buffer(p, -1, f"argument {i}: {p.type}", None)
    for index, op in enumerate(module.ops):
        kind = category(op)
        for position, r in enumerate(op.results):
            reuse = None
            if kind == "view":  # result i is operand i (optimization_barrier has several)
                reuse = owner[op.operands[min(position, len(op.operands) - 1)]]
            elif _in_place(op):
                # take over an operand's buffer of the same size that dies here
                reuse = next((owner[v] for v in op.operands
                              if end.get(owner[v]) == index and owner[v].type.nbytes == r.type.nbytes
                              and owner[v] not in module.outputs), None)
            if reuse is not None:
                owner[r] = reuse
                end[reuse] = max(end[reuse], last_use.get(r, index))
            else:
                maker = _producer(op, r)
                new_buffer(r, -1 if kind == "constant" else index, f"{maker.kind} result {r.type}",
                           maker.source)

    params = set(module.params)
    output_owners = {owner[v] for v in module.outputs}
    buffers = [_region_scratch(op, index) for index, op in enumerate(module.ops)
               if category(op) == "region"]
    for v, start in defined_at.items():
        if v.type.size <= 1 and start == -1 and v not in module.params:
            continue  # scalar constants are immediates
        what, source = described[v]
        role = "argument" if v in params else "output" if v in output_owners else "temp"
        buffers.append(Buffer(what, v.type.nbytes, source, start, end[v], role))

    return dataclasses.replace(
        _sweep(buffers, n_ops),
        argument_bytes=sum(p.type.nbytes for p in module.params),
        output_bytes=sum(v.type.nbytes for v in dict.fromkeys(module.outputs)),
        temp_bytes=_sweep([b for b in buffers if b.role == "temp"], n_ops).peak_bytes,
        alias_bytes=sum(p.type.nbytes for i, p in enumerate(module.params) if i in donated))


def _producer(op, value):
    """The op that computes ``value``: inside a fused kernel, the body's op."""
    if op.kind == "fused_kernel":
        return op.regions["body"].producers().get(value, op)
    return op


def _region_scratch(op, index: int) -> Buffer:
    """While a region op runs, its costliest region's own intermediates are
    live too (its parameters alias the op's operands)."""
    scratch = max(plan_memory(r).peak_bytes - sum(p.type.nbytes for p in r.params)
                  for r in op.regions.values())
    return Buffer(f"{op.kind} scratch", max(scratch, 0), op.source, index, index)


def _sweep(buffers: list[Buffer], n_ops: int) -> MemoryPlan:
    # sweep over steps (step = op index + 1): a buffer is live from the op
    # that defines it through the last op that uses it, inclusive
    delta = [0] * (n_ops + 3)
    for b in buffers:
        delta[b.start + 1] += b.nbytes
        delta[b.end + 2] -= b.nbytes
    live = peak = 0
    peak_at = -1
    for step in range(n_ops + 2):
        live += delta[step]
        if live > peak:
            peak, peak_at = live, step - 1
    return MemoryPlan(tuple(buffers), peak, peak_at)
