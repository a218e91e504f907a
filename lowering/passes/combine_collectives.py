"""Collective combining: independent collectives of one kind and the same
attributes become one op with several operands, so the chip sends one
message (one latency, one launch) where it sent one per collective.

XLA's AllReduceCombiner, AllGatherCombiner and ReduceScatterCombiner do this;
TorchRec exchanges the pooled embeddings of every table of a sharding group
in one collective. After the partition pass, each row-wise embedding table
of a sharded DLRM has its partial sums resolved by a reduce-scatter (or an
all-reduce) of its own; this pass makes them one.

A collective op (``lowering.collectives.COLLECTIVE_KINDS``) may carry n
operands and n results: result i is the collective of operand i, each with
the op's attributes (``runtime.executor`` emits one JAX collective per
operand; the cost model charges the bytes of all of them). The rule, applied
to a function body and, on their own, to every region body (scan, while,
cond):

- *Candidates*: collectives of the same kind with equal attributes (mesh
  axis or axes, dim, split and concat, perm, reduce, group). Shapes and
  dtypes may differ. Ops with ``payload_bytes`` (MoE dispatch, costed by a
  size other than their buffer's) are left alone.
- *Groups*: in program order, a collective joins the open group of its
  attributes unless it depends on that group's results (through any chain
  of ops, the groups already formed included, so that no two groups wait
  for each other) or the group would pass ``COMBINE_THRESHOLD_BYTES``; else
  it opens a new group. Ops with effects (printing, io callbacks) keep their
  order among themselves, as a chain of dependencies.
- *Placement*: a group of two or more becomes one op at its last member's
  place, where every operand is computed. Ops in between that read an
  earlier member's result move after it; all other ops keep their order (a
  stable topological sort). The combined op's results are the members' own
  values, so nothing downstream is renamed. Its source line is the first
  member's.

The cap. Combining saves a per-message latency for every op merged, but the
merged op starts only when its last operand is ready (the early members
lose their overlap with the compute between them) and keeps all its buffers
live at once. Once a combined message is tens of MB, its bandwidth term
dwarfs the latencies saved (on MTIA 400, 30 MiB takes ~26 us on a link
where a message's latency is 2 us). The cap is XLA's default combine
threshold (``kDefaultAllReduceCombineThreshold`` and its all-gather and
reduce-scatter twins, 30 MiB, ``xla/service/collective_utils.h``), counted
as the larger of an op's send and receive buffers.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict

from lowering.collectives import COLLECTIVE_KINDS
from lowering.ir import Module, Op, Value

COMBINE_THRESHOLD_BYTES = 30 * 2**20

_EFFECTS = object()  # stands for "the effects so far" in the dependency maps


def run(module: Module, ctx=None) -> Module:
    ops = [dataclasses.replace(op, regions={name: run(r, ctx) for name, r in op.regions.items()})
           if op.regions else op for op in module.ops]
    groups = _groups(ops)
    return dataclasses.replace(module, ops=_schedule(ops, groups) if groups else ops)


def _key(op: Op):
    """What a collective must share with those it is combined with; None: never combined."""
    if op.kind not in COLLECTIVE_KINDS or "payload_bytes" in op.attrs:
        return None
    return op.kind, tuple(sorted((name, repr(value)) for name, value in op.attrs.items()))


def _nbytes(op: Op) -> int:
    """The larger of an op's send and receive buffers."""
    return max(sum(v.type.nbytes for v in op.operands), sum(v.type.nbytes for v in op.results))


def _inputs(op: Op) -> list:
    return [*op.operands, _EFFECTS] if op.attrs.get("effects") else op.operands


def _outputs(op: Op) -> list:
    return [*op.results, _EFFECTS] if op.attrs.get("effects") else op.results


def _closure(start, after: list[set[int]]) -> set[int]:
    """``start`` and every group those groups depend on."""
    seen, stack = set(), list(start)
    while stack:
        g = stack.pop()
        if g not in seen:
            seen.add(g)
            stack.extend(after[g])
    return seen


def _groups(ops: list[Op]) -> list[list[int]]:
    """The indices of the collectives combined into one op, per group of two or more."""
    members: list[list[int]] = []
    after: list[set[int]] = []  # per group: the groups its members' operands depend on
    size: list[int] = []
    open_group: dict = {}  # key -> the group a collective with that key may join
    needs: dict = {}  # value -> the groups it depends on directly
    for i, op in enumerate(ops):
        below = set().union(*(needs.get(v, ()) for v in _inputs(op)))
        key = _key(op)
        if key is None:
            for v in _outputs(op):
                needs[v] = below
            continue
        g = open_group.get(key)
        if g is None or g in _closure(below, after) or size[g] + _nbytes(op) > COMBINE_THRESHOLD_BYTES:
            g = open_group[key] = len(members)
            members.append([])
            after.append(set())
            size.append(0)
        members[g].append(i)
        after[g] |= below
        size[g] += _nbytes(op)
        for v in _outputs(op):
            needs[v] = {g}
    return [m for m in members if len(m) > 1]


def _schedule(ops: list[Op], groups: list[list[int]]) -> list[Op]:
    """The ops with each group made one op at its last member's place, in a
    stable topological order (by original place)."""
    nodes = dict(enumerate(ops))
    for group in groups:
        first = ops[group[0]]
        for i in group:
            del nodes[i]
        nodes[group[-1]] = Op(first.kind, [v for i in group for v in ops[i].operands],
                              [r for i in group for r in ops[i].results], dict(first.attrs), first.source)
    made_by = {r: i for i, op in nodes.items() for r in op.results}
    waits = {i: {made_by[v] for v in op.operands if v in made_by} for i, op in nodes.items()}
    effects = sorted(i for i, op in nodes.items() if op.attrs.get("effects"))
    for before, i in zip(effects, effects[1:]):
        waits[i].add(before)
    users: dict[int, list[int]] = defaultdict(list)
    for i, w in waits.items():
        for d in w:
            users[d].append(i)
    ready = [i for i, w in waits.items() if not w]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waits[u].discard(i)
            if not waits[u]:
                heapq.heappush(ready, u)
    assert len(order) == len(nodes), "combining collectives made a cycle"
    return order
