"""Pipeline parallelism: a model split into stages along one mesh axis,
microbatches flowing through them, modeled from shapes.

    mesh = mtia_jax.make_mesh((2, 72), ("pod", "model"), chip="mtia450", scale_out_axes=("pod",))
    stages = [mtia_jax.PipelineStage(stage_fn, *shapes_of_stage_s, in_shardings=...) for s in ...]
    report = mtia_jax.estimate_pipeline(stages, mesh=mesh, axis="pod", microbatches=8)
    print(report.table())

Stage ``s`` runs on the devices at index ``s`` of ``axis`` (or at flat index
``s`` of a tuple of axes, e.g. ``("pod", "stage")``: 9 stages in each of 2
racks), a sub-mesh made of the other axes ( over which the stage itself may be tensor or data
parallel). Each stage is a program of its own, estimated from the shapes of
*one microbatch* by ``mtia_jax.estimate`` on that sub-mesh. Its first output
(the activations) is sent to the next stage, point to point over ``axis``
(over the scale-out network where the two stages sit in different racks, each
device to its peer at the same place of the sub-mesh; ``lowering.network``,
a ``permute``); its other outputs stay on the stage (the keys and values a
prefill writes into the KV cache), one copy per microbatch.

The schedule is simulated per microbatch: stage s starts microbatch m once
it has finished microbatch m - 1 and microbatch m has arrived from stage
s - 1; a stage's sends go out one after another on its network stream,
overlapping its next microbatch. For stages of t seconds and sends of c
seconds (c <= t) the step takes ``(M + S - 1) t + (S - 1) c``; the *bubble*
is what exceeds the busiest stage's own work, ``(S - 1)(t + c)`` there:
``(S - 1) / (M + S - 1)`` of the step when c = 0 (GPipe, Huang et al.
2019). ``schedule``: "gpipe" (all forwards, then all backwards) or "1f1b"
(one forward, one backward; PipeDream-Flush, Narayanan et al. 2021). The
programs here are forward passes (inference: prefill), where the two
schedules issue the same forwards in the same order and differ in nothing
modeled; they differ only when backwards interleave (activation memory).

Every time is modeled. A pipeline is modeled, not run: its numerics are
those of its stages applied in order, each an ordinary program
(``mtia_jax.jit``; ``models.transformer.prefill_stage`` composes to
``forward``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

import mtia_jax
from lowering import network
from lowering.passes.partitioner import spec_axes
from mtia_jax import chips as chip_catalogue
from mtia_jax import mesh as mesh_lib

if TYPE_CHECKING:  # the module mtia_jax.estimate is loaded by mtia_jax's lazy attribute, not here
    from mtia_jax.estimate import Report

SCHEDULES = ("gpipe", "1f1b")


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineStage:
    """One stage: ``fun(*args)`` on one microbatch, with shardings over the
    stage's sub-mesh (the mesh without the pipeline axis). The same stage
    object may stand for several stages of a uniform pipeline."""

    fun: Callable
    args: tuple
    in_shardings: Any = None
    out_shardings: Any = None
    donate_argnums: tuple = ()

    def __init__(self, fun: Callable, *args, in_shardings=None, out_shardings=None, donate_argnums=()):
        for name, value in (("fun", fun), ("args", args), ("in_shardings", in_shardings),
                            ("out_shardings", out_shardings), ("donate_argnums", tuple(donate_argnums))):
            object.__setattr__(self, name, value)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One microbatch on one stage (or one send to the next stage), modeled seconds."""

    stage: int
    microbatch: int
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True)
class PipelineReport:
    """A modeled pipelined step (per device; a performance model, not a measurement)."""

    chip: Any
    axes: tuple[str, ...]
    schedule: str
    microbatches: int
    stages: tuple[Report, ...]   # each stage's program on one microbatch
    sends: tuple[network.Phase, ...]  # stage s -> s + 1, one microbatch's activations
    compute: tuple[Slot, ...]
    transfers: tuple[Slot, ...]
    kept_bytes: tuple[float, ...]  # per device of each stage: outputs kept per microbatch

    @property
    def time_s(self) -> float:
        return max(slot.end_s for slot in self.compute)

    @property
    def stage_time_s(self) -> tuple[float, ...]:
        return tuple(r.time_s for r in self.stages)

    @property
    def bubble_s(self) -> float:
        """The step's time beyond the busiest stage's own work (M microbatches)."""
        return self.time_s - self.microbatches * max(self.stage_time_s)

    @property
    def bubble_fraction(self) -> float:
        return self.bubble_s / self.time_s

    def _per_stage_scale_out(self, field: str, send_field: str) -> float:
        """Per device of the busiest stage over one step: sends across domains
        plus the stage's own collectives across domains."""
        return max(self.microbatches * (getattr(r, field)
                                        + sum(getattr(ph, send_field) for ph in self.sends[s:s + 1]
                                              if ph.fabric == "scale-out"))
                   for s, r in enumerate(self.stages))

    @property
    def scale_out_s(self) -> float:
        return self._per_stage_scale_out("scale_out_s", "time_s")

    @property
    def scale_out_bytes(self) -> float:
        return self._per_stage_scale_out("scale_out_bytes", "sent_bytes")

    @property
    def peak_hbm_bytes(self) -> tuple[int, ...]:
        """Per stage: its program's peak on one microbatch plus what the other
        microbatches keep (their KV rows)."""
        return tuple(int(r.peak_hbm_bytes + (self.microbatches - 1) * kept)
                     for r, kept in zip(self.stages, self.kept_bytes))

    @property
    def fits(self) -> bool:
        return all(peak <= self.chip.hbm_bytes for peak in self.peak_hbm_bytes)

    def summary(self) -> str:
        s, m = len(self.stages), self.microbatches
        fabrics = dict.fromkeys(ph.fabric for ph in self.sends)
        sends = ", ".join(f"{max(ph.time_s for ph in self.sends if ph.fabric == f) * 1e6:.4g} us {f}"
                          for f in fabrics) or "none"
        return (f"pipeline of {s} stages over {'x'.join(self.axes)} ({self.schedule}, {m} microbatches, "
                f"{self.stages[0].devices} x {self.chip.name} per stage; modeled): "
                f"{self.time_s * 1e3:.4g} ms per step; stage {max(self.stage_time_s) * 1e3:.4g} ms per "
                f"microbatch; bubble {self.bubble_s * 1e3:.4g} ms ({self.bubble_fraction:.1%}; "
                f"(S-1)/(M+S-1) = {(s - 1) / (m + s - 1):.1%}); send per microbatch {sends}; "
                f"scale-out {self.scale_out_s * 1e3:.4g} ms, {self.scale_out_bytes / 1e9:.4g} GB per device; "
                f"peak HBM {max(self.peak_hbm_bytes) / 1e9:.4g} of {self.chip.hbm_bytes / 1e9:.4g} GB "
                f"({'fits' if self.fits else 'DOES NOT FIT'})")

    def timeline(self, width: int = 72) -> str:
        """Per stage, which microbatch it computes (digits, mod 10) and where it idles (.)."""
        total = self.time_s
        rows = []
        for s in range(len(self.stages)):
            cells = ["."] * width
            for slot in self.compute:
                if slot.stage == s:
                    lo, hi = int(slot.start_s / total * width), max(int(slot.end_s / total * width), 1)
                    for i in range(lo, min(hi, width)):
                        cells[i] = str(slot.microbatch % 10)
            rows.append(f"  stage {s:<3} |{''.join(cells)}|")
        return "\n".join(rows)

    def table(self) -> str:
        lines = [self.summary(), "timeline (modeled):", self.timeline(), "stages (one microbatch each):"]
        for s, r in enumerate(self.stages):
            send = f", then {self.sends[s].time_s * 1e6:.4g} us {self.sends[s]}" if s < len(self.sends) else ""
            lines.append(f"  stage {s}: {r.time_s * 1e3:.4g} ms, collectives {r.collective_time_s * 1e3:.4g} "
                         f"ms{send}; peak HBM {self.peak_hbm_bytes[s] / 1e9:.4g} GB")
        return "\n".join(lines)

    __str__ = summary


def simulate(stage_s: Sequence[float], send_s: Sequence[float], microbatches: int):
    """(compute slots, send slots) of a forward pipeline; see the module doc."""
    stages = len(stage_s)
    free = [0.0] * stages         # when each stage's compute is next free
    link = [0.0] * stages         # when each stage's outgoing sends are next free
    compute, sends = [], []
    for m in range(microbatches):
        arrived = 0.0
        for s in range(stages):
            start = max(arrived, free[s])
            free[s] = start + stage_s[s]
            compute.append(Slot(s, m, start, free[s]))
            if s + 1 < stages:
                begin = max(free[s], link[s])
                link[s] = arrived = begin + send_s[s]
                sends.append(Slot(s, m, begin, arrived))
    return tuple(compute), tuple(sends)


def _mentions(spec_tree, axes: tuple[str, ...]) -> bool:
    specs = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return any(set(spec_axes(entry)) & set(axes)
               for spec in specs if isinstance(spec, jax.sharding.PartitionSpec) for entry in spec)


def estimate_pipeline(stages: Sequence[PipelineStage], *, mesh, axis, microbatches: int,
                      schedule: str = "gpipe", chip=None, precision=None) -> PipelineReport:
    """Model one pipelined step of ``stages`` over mesh axis ``axis``; see the module doc.

    ``axis``: a mesh axis, or a tuple of them (major first): stage ``s`` is
    the devices at the flat index ``s`` of those axes, e.g. ``("pod",
    "stage")`` for 9 stages in each of 2 racks. ``stages``: one
    ``PipelineStage`` per stage (a uniform pipeline may repeat one object;
    it is estimated once). Raises ``ValueError`` for a stage count other than
    the axes' size, an unknown axis or schedule, fewer than one microbatch,
    or stage shardings that name a pipeline axis."""
    stages = tuple(stages)
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    unknown = [a for a in axes if a not in sizes]
    if unknown or not axes:
        raise ValueError(f"estimate_pipeline: axis {axis!r} is not a mesh axis; the mesh has {sizes}")
    shape = tuple(sizes[a] for a in axes)
    if len(stages) != math.prod(shape):
        raise ValueError(f"estimate_pipeline: {len(stages)} stages for the mesh axes "
                         f"{dict(zip(axes, shape))} ({math.prod(shape)} places); give one "
                         f"PipelineStage per place")
    if schedule not in SCHEDULES:
        raise ValueError(f"estimate_pipeline: unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"estimate_pipeline: microbatches must be a positive integer, got {microbatches!r}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, PipelineStage):
            raise TypeError(f"estimate_pipeline: stage {i} is a {type(stage).__name__}; wrap each "
                            f"stage as mtia_jax.PipelineStage(fun, *args, in_shardings=...)")
        if _mentions((stage.in_shardings, stage.out_shardings), axes):
            raise ValueError(f"estimate_pipeline: stage {i}'s shardings name a pipeline axis {axes}; "
                             f"a stage runs on the other axes {tuple(n for n in sizes if n not in axes)} only")
    spec = chip_catalogue.get(chip) if chip is not None else chip_catalogue.default()
    sub = _stage_mesh(mesh, axes, spec.name)
    reports: dict[int, Report] = {}
    for stage in stages:
        if id(stage) not in reports:
            reports[id(stage)] = mtia_jax.estimate(
                stage.fun, *stage.args, chip=spec, mesh=sub, precision=precision,
                in_shardings=stage.in_shardings, out_shardings=stage.out_shardings,
                donate_argnums=stage.donate_argnums)
    per_stage = tuple(reports[id(stage)] for stage in stages)
    outer = [i for i, a in enumerate(axes) if a in mesh_lib.scale_out_axes(mesh)]
    sends, kept = [], []
    for s, r in enumerate(per_stage):
        out = [v.type.nbytes for v in r.module.outputs]
        kept.append(float(sum(out[1:])))
        if s + 1 < len(stages):  # crosses racks when a scale-out axis's index changes
            here, there = np.unravel_index(s, shape), np.unravel_index(s + 1, shape)
            fabric = (network.scale_out(spec) if any(here[i] != there[i] for i in outer)
                      else network.scale_up(spec))
            sends.append(network.phase("permute", len(stages), float(out[0]) if out else 0.0, fabric))
    compute, transfers = simulate([r.time_s for r in per_stage], [ph.time_s for ph in sends], microbatches)
    return PipelineReport(spec, axes, schedule, microbatches, per_stage, tuple(sends), compute, transfers,
                          tuple(kept))


def _stage_mesh(mesh, axes: tuple[str, ...], chip: str):
    """The mesh one stage runs on: the axes other than the pipeline's."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    names = tuple(n for n in mesh.axis_names if n not in axes)
    return mesh_lib.make_mesh(tuple(sizes[n] for n in names) or (1,), names or ("stage",), chip=chip,
                              scale_out_axes=tuple(a for a in mesh_lib.scale_out_axes(mesh) if a in names))


__all__ = ["PipelineStage", "PipelineReport", "Slot", "SCHEDULES", "estimate_pipeline", "simulate"]
