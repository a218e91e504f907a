"""``mtia_jax.estimate``: model a program from shapes alone.

    report = mtia_jax.estimate(model_fn, params_shapes, tokens_shape, chip="mtia500")
    print(report.table())

Arguments may be ``jax.ShapeDtypeStruct``s (or arrays, whose shapes are
used). The program is traced and run through the whole compiler pipeline,
with no numerics and no allocation, so a model far larger than the host's
memory is estimated in seconds. Unlike ``jit(...).lower(...).compile()`` a
program that does not fit the chip's HBM is reported (``fits`` is False)
rather than refused.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax

from lowering.ir import Module
from mtia_jax import api
from runtime import power
from runtime.cost_model import ProgramCost, program_cost
from runtime.memory import MemoryPlan
from mtia_jax.errors import UnmeasuredLoopWarning
from mtia_jax.profiler import Profile


@dataclasses.dataclass(frozen=True)
class Report:
    """Modeled cost of a program on one chip (a performance model, not a measurement)."""

    chip: object
    module: Module
    cost: ProgramCost
    memory: MemoryPlan
    precision: object = None

    @property
    def time_s(self) -> float:
        return self.cost.time_s

    @property
    def roofline_time_s(self) -> float:
        return self.cost.roofline_time_s

    @property
    def efficiency(self) -> float:
        return self.cost.roofline_time_s / self.cost.time_s if self.cost.time_s > 0 else 1.0

    @property
    def peak_hbm_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.chip.hbm_bytes

    @property
    def flops(self) -> float:
        return self.cost.total("flops")

    @property
    def collective_time_s(self) -> float:
        """Modeled time on the network stream (it overlaps compute where it can)."""
        return float(sum(k.time_s for k in self.cost.kernels if k.stream == "network"))

    @property
    def collective_bytes(self) -> float:
        return self.cost.total("collective_bytes")

    def energy(self, **assumptions):
        """Modeled energy of one execution per device (``runtime.power``:
        idle power plus compute and HBM activity, TDP at full load);
        ``assumptions``: ``idle_fraction=``, ``compute_share=``."""
        return power.energy(self.cost, self.chip, **assumptions)

    @property
    def scale_out_s(self) -> float:
        """Of ``collective_time_s``, the modeled time of phases across scale-up
        domains (mesh axes marked ``scale_out_axes``)."""
        return float(sum(k.scale_out_s for k in self.cost.kernels))

    @property
    def scale_out_bytes(self) -> float:
        return float(sum(k.scale_out_bytes for k in self.cost.kernels))

    @property
    def devices(self) -> int:
        return self.module.layout.devices if self.module.layout is not None else 1

    def breakdown(self, by: str = "kind") -> dict[str, float]:
        """Modeled seconds per op kind (``by="kind"``) or per bound (``by="bound"``:
        compute / memory / launch / host / network)."""
        totals: dict[str, float] = {}
        for k in self.cost.kernels:
            key = k.kind.split("[", 1)[0] if by == "kind" else k.bound
            totals[key] = totals.get(key, 0.0) + k.time_s
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {"chip": self.chip.name, "devices": self.devices, "time_s": self.time_s,
                "roofline_time_s": self.roofline_time_s, "efficiency": self.efficiency,
                "peak_hbm_bytes": self.peak_hbm_bytes, "hbm_capacity_bytes": self.chip.hbm_bytes,
                "fits": self.fits, "flops": self.flops, "hbm_bytes": self.hbm_bytes,
                "collective_time_s": self.collective_time_s, "collective_bytes": self.collective_bytes,
                "scale_out_s": self.scale_out_s, "scale_out_bytes": self.scale_out_bytes,
                "unmeasured_loops": list(self.cost.assumed_loops),
                "precision": str(self.precision) if self.precision is not None else None,
                "by_kind": self.breakdown("kind"), "by_bound": self.breakdown("bound")}

    @property
    def hbm_bytes(self) -> float:
        return self.cost.total("hbm_bytes")

    def profile(self) -> Profile:
        return Profile.from_cost(self.cost)

    def summary(self) -> str:
        fits = "fits" if self.fits else "DOES NOT FIT"
        policy = f", precision {self.precision}" if self.precision is not None else ""
        where = f"{self.devices} x {self.chip.name}" if self.devices > 1 else self.chip.name
        per = " per device" if self.devices > 1 else ""
        return (f"{self.module.name} on {where}{policy} (modeled{per}): "
                f"{self.time_s * 1e3:.4g} ms, roofline {self.roofline_time_s * 1e3:.4g} ms "
                f"(efficiency {self.efficiency:.2f}), {self.flops / 1e12:.4g} TFLOP, "
                f"{self.hbm_bytes / 1e9:.4g} GB HBM traffic, peak HBM "
                f"{self.peak_hbm_bytes / 1e9:.4g} of {self.chip.hbm_bytes / 1e9:.4g} GB ({fits})")

    def table(self) -> str:
        """The summary, then modeled time by op kind and by bound, then the kernels."""
        total = self.time_s or 1.0
        lines = [self.summary()]
        for by in ("kind", "bound"):
            lines.append(f"by {by}:")
            lines += [f"  {name:<28} {s * 1e6:>12.2f} us  {s / total:>6.1%}"
                      for name, s in self.breakdown(by).items()]
        lines.append(str(self.profile()))
        return "\n".join(lines)

    __str__ = summary


def _as_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def estimate(fun, *args, chip=None, mesh=None, in_shardings=None, out_shardings=None,
             precision=None, static_argnums=(), static_argnames=(), donate_argnums=(),
             loop_trips=None, mode="graph", **kwargs) -> Report:
    """Model ``fun(*args, **kwargs)`` on ``chip`` from shapes only; see the module doc.

    With a mesh (``mesh=`` or ``NamedSharding`` shardings) the program is
    partitioned and the report is per device, collectives included.
    ``donate_argnums`` as for ``jit``: a donated buffer may be updated in
    place (a KV cache written one row per sequence). ``loop_trips``: the
    trips per execution of while loops whose count depends on data (one
    number for all, or a dict keyed by the loop's source line ``"file.py:12"``,
    its line number, or its path); loops with a count fixed by the program
    need none. A loop left without a count is charged one trip per execution,
    with a warning and a line in ``table()``. ``mode``: how kernels are
    launched, as for ``jit``: "graph" (the device's command processor
    launches the recorded kernels, each launch overlapping the kernel before
    it) or "eager" (the host launches one kernel at a time)."""
    jitted = api.jit(fun, chip=chip, precision=precision, static_argnums=static_argnums,
                     static_argnames=static_argnames, donate_argnums=donate_argnums,
                     in_shardings=in_shardings, out_shardings=out_shardings, mesh=mesh)
    statics = jitted._signature
    args = [a if i in statics.static_argnums else jax.tree.map(_as_struct, a)
            for i, a in enumerate(args)]
    kwargs = {k: v if k in statics.static_argnames else jax.tree.map(_as_struct, v)
              for k, v in kwargs.items()}
    lowered = jitted.lower(*args, **kwargs)
    module, memory = lowered.optimize()
    cost = program_cost(module, lowered.chip, loop_trips=loop_trips, mode=mode)
    for loop in cost.assumed_loops:
        warnings.warn(f"mtia_jax.estimate: the while loop at {loop} runs a data-dependent "
                      f"number of trips; it is modeled at 1 trip per execution. Pass "
                      f"loop_trips=... (e.g. loop_trips=100) to model it.", UnmeasuredLoopWarning,
                      stacklevel=2)
    return Report(lowered.chip, module, cost, memory, lowered.precision)
