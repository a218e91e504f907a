"""The partitioner's state and resharding: placements of global values
(specs over mesh axes and pending partial sums), their per-device values,
and the collectives that move a value from one placement to another. The
rules that place each op kind are in ``lowering.passes.partition`` (and, for
embedding lookups and MoE, ``partition_embedding`` and ``partition_moe``)."""

from __future__ import annotations

import math
from typing import Callable

from lowering.ir import Op, TensorType, Value

Spec = tuple  # per dimension: None, a mesh axis name, or a tuple of mesh axes (major first)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes a spec entry splits its dimension over, major first."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def spec_entry(axes: tuple[str, ...]):
    """The spec entry of a dimension split over ``axes``: None, one axis, or a tuple."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def overlaps(entry, entries) -> bool:
    """Whether ``entry`` splits over a mesh axis that one of ``entries`` uses."""
    used = {a for e in entries for a in spec_axes(e)}
    return any(a in used for a in spec_axes(entry))


class MeshSizes(dict):
    """Mesh axis -> size. A tuple of axes (one dimension split over several)
    looks up the product of their sizes."""

    def __missing__(self, key):
        if isinstance(key, tuple):
            return math.prod(self[a] for a in key)
        raise KeyError(key)


def normalize_spec(pspec, ndim: int) -> Spec:
    """A ``PartitionSpec`` (or None) as one entry per dimension: None, a mesh
    axis, or a tuple of several mesh axes (the dimension split over their
    product, the first axis major, as in JAX)."""
    entries = tuple(pspec) if pspec is not None else ()
    if len(entries) > ndim:
        raise ValueError(f"a PartitionSpec with {len(entries)} entries for an array of rank {ndim}")
    spec = []
    for entry in entries + (None,) * (ndim - len(entries)):
        entry = spec_entry(tuple(entry)) if isinstance(entry, (tuple, list)) else entry
        if overlaps(entry, spec):
            raise ValueError(f"the PartitionSpec {pspec} uses a mesh axis of {entry!r} for two "
                             f"dimensions; each mesh axis may split one dimension")
        spec.append(entry)
    return tuple(spec)


def _axes_attrs(axes: tuple[str, ...]) -> dict:
    """A collective's axis attribute: ``axis`` for one mesh axis, ``axes`` for several."""
    return {"axis": axes[0]} if len(axes) == 1 else {"axes": tuple(axes)}


def _common_prefix(cur: tuple, want: tuple) -> int:
    n = 0
    while n < min(len(cur), len(want)) and cur[n] == want[n]:
        n += 1
    return n


class Partitioner:
    """Builds the per-device ops for one module (or region). ``precision``
    (a ``mtia_jax.PrecisionPolicy`` or None) is the policy the precision
    pass will apply: contractions it may quantize are split only where every
    device keeps whole MX blocks. ``rule_for`` gives the rule that
    partitions an op (``lowering.passes.partition`` keeps the tables)."""

    def __init__(self, mesh: dict[str, int], precision=None,
                 rule_for: Callable[[Op], Callable[[Partitioner, Op], None]] | None = None):
        self.mesh = MeshSizes(mesh)
        self.precision = precision
        self.rule_for = rule_for
        self.ops: list[Op] = []
        self.local: dict[Value, Value] = {}
        self.spec: dict[Value, Spec] = {}
        self.partial: dict[Value, frozenset[str]] = {}
        self.source = None

    # ------------------------------------------------------------ values

    def local_type(self, t: TensorType, spec: Spec) -> TensorType:
        shape = tuple(d // self.mesh[a] if a else d for d, a in zip(t.shape, spec))
        return TensorType(shape, t.dtype)

    def bind(self, v: Value, local: Value, spec: Spec, partial=frozenset()) -> None:
        """``v``'s per-device value and placement; ``partial`` may name
        several-axis entries: it is kept as single mesh axes."""
        self.local[v], self.spec[v] = local, tuple(spec)
        self.partial[v] = frozenset(a for entry in partial for a in spec_axes(entry))

    def emit(self, kind: str, operands: list[Value], types: list[TensorType], attrs: dict,
             regions=None) -> list[Value]:
        results = [Value(t) for t in types]
        self.ops.append(Op(kind, operands, results, attrs, self.source, regions or {}))
        return results

    def collective(self, kind: str, x: Value, shape: tuple, **attrs) -> Value:
        axes = attrs.get("axes") or (attrs["axis"],)
        attrs["group"] = math.prod(self.mesh[a] for a in axes)
        if attrs["group"] == 1:  # over axes of size 1: the value as it is
            return x
        return self.emit(kind, [x], [TensorType(tuple(shape), x.type.dtype)], attrs)[0]

    def fits(self, size: int, axis) -> bool:
        return axis is None or size % self.mesh[axis] == 0

    def _resized(self, lv: Value, dim: int, axes: tuple[str, ...], grow: bool) -> list[int]:
        shape = list(lv.type.shape)
        factor = self.mesh[tuple(axes)]
        shape[dim] = shape[dim] * factor if grow else shape[dim] // factor
        return shape

    # ------------------------------------------------------------ resharding

    def resolve(self, v: Value, want: Spec | None = None) -> None:
        """Add up ``v``'s partial sums: a reduce-scatter onto a dim ``want``
        splits further (over the axes it adds, minor to the dim's current
        ones), an all-reduce over the rest."""
        axes = set(self.partial.get(v, ()))
        if not axes:
            return
        lv, spec = self.local[v], [spec_axes(a) for a in self.spec[v]]
        for d, entry in enumerate(want or ()):
            wanted, have = spec_axes(entry), spec[d]
            if wanted[:len(have)] != have:
                continue
            run = []
            for a in wanted[len(have):]:
                if a not in axes or overlaps(a, spec):
                    break
                run.append(a)
            if run and self.fits(lv.type.shape[d], tuple(run)):
                shape = self._resized(lv, d, tuple(run), grow=False)
                lv = self.collective("reduce_scatter", lv, shape, dim=d, **_axes_attrs(tuple(run)))
                spec[d] = have + tuple(run)
                axes.difference_update(run)
        if axes:
            ordered = tuple(a for a in self.mesh if a in axes)
            lv = self.collective("all_reduce", lv, lv.type.shape, axes=ordered, reduce="sum")
        self.bind(v, lv, [spec_entry(s) for s in spec])

    def to_spec(self, v: Value, target: Spec, keep_partial: bool = False) -> Value:
        """``v``'s per-device value laid out as ``target``.

        A dim split over several axes holds, on device (i, j, ...), block
        ``(i * size_j + j) ...`` (the first axis major), so an axis can be
        added or removed only at the minor end: the minor axes that must go
        are moved to another dim that wants them next (one ``all_to_all``
        each) or gathered (one ``all_gather`` over all of them), then the
        missing ones are split off locally (one ``shard_slice``)."""
        if not keep_partial:
            self.resolve(v, target)
        target = tuple(a if self.fits(n, a) else None for n, a in zip(v.type.shape, target))
        lv = self.local[v]
        cur = [spec_axes(a) for a in self.spec[v]]
        want = [spec_axes(a) for a in target]
        if cur == want:
            return lv
        for src in range(len(cur)):  # a minor axis moving to where another dim wants it: all-to-all
            while cur[src] and want[src][:len(cur[src])] != cur[src]:
                a = cur[src][-1]
                dst = next((d for d in range(len(cur)) if d != src
                            and want[d][:len(cur[d]) + 1] == cur[d] + (a,)), None)
                if dst is None:
                    break
                shape = self._resized(lv, src, (a,), grow=True)
                shape[dst] //= self.mesh[a]
                lv = self.collective("all_to_all", lv, shape, axis=a, split=dst, concat=src)
                cur[src], cur[dst] = cur[src][:-1], cur[dst] + (a,)
        for d in range(len(cur)):  # replicate what must move
            keep = _common_prefix(cur[d], want[d])
            if keep < len(cur[d]):
                gathered = cur[d][keep:]
                lv = self.collective("all_gather", lv, self._resized(lv, d, gathered, grow=True),
                                     dim=d, **_axes_attrs(gathered))
                cur[d] = cur[d][:keep]
        for d in range(len(cur)):  # split locally: no communication
            if len(cur[d]) < len(want[d]):
                added = want[d][len(cur[d]):]
                lv = self.collective("shard_slice", lv, self._resized(lv, d, added, grow=False),
                                     dim=d, **_axes_attrs(added))
                cur[d] = want[d]
        if not keep_partial:
            self.bind(v, lv, target)
        return lv

    def replicated(self, v: Value) -> Value:
        return self.to_spec(v, (None,) * len(v.type.shape))

    # ------------------------------------------------------------ driving

    def run_ops(self, ops: list[Op]) -> None:
        for op in ops:
            self.source = op.source
            self.rule_for(op)(self, op)

    def run_replicated(self, op: Op) -> None:
        """The fallback for an op without regions: every operand replicated,
        the op runs whole on every device."""
        operands = [self.replicated(v) for v in op.operands]
        self.same_op(op, operands, [(None,) * len(r.type.shape) for r in op.results])

    def same_op(self, op: Op, operands: list[Value], specs: list[Spec], partial=frozenset(),
                params: dict | None = None) -> None:
        """Emit ``op`` on per-device operands; its results get ``specs``."""
        types = [self.local_type(r.type, s) for r, s in zip(op.results, specs)]
        attrs = dict(op.attrs)
        if params is not None:
            attrs["params"] = params
        results = self.emit(op.kind, operands, types, attrs)
        for r, lr, s in zip(op.results, results, specs):
            self.bind(r, lr, s, partial)
