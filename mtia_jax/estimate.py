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

import jax

from lowering.ir import Module
from mtia_jax import api
from runtime.cost_model import ProgramCost, program_cost
from runtime.memory import MemoryPlan
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
    def hbm_bytes(self) -> float:
        return self.cost.total("hbm_bytes")

    def profile(self) -> Profile:
        return Profile.from_cost(self.cost)

    def summary(self) -> str:
        fits = "fits" if self.fits else "DOES NOT FIT"
        policy = f", precision {self.precision}" if self.precision is not None else ""
        return (f"{self.module.name} on {self.chip.name}{policy} (modeled): "
                f"{self.time_s * 1e3:.4g} ms, roofline {self.roofline_time_s * 1e3:.4g} ms "
                f"(efficiency {self.efficiency:.2f}), {self.flops / 1e12:.4g} TFLOP, "
                f"{self.hbm_bytes / 1e9:.4g} GB HBM traffic, peak HBM "
                f"{self.peak_hbm_bytes / 1e9:.4g} of {self.chip.hbm_bytes / 1e9:.4g} GB ({fits})")

    def table(self) -> str:
        return f"{self.summary()}\n{self.profile()}"

    __str__ = summary


def _as_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def estimate(fun, *args, chip=None, precision=None, static_argnums=(), static_argnames=(),
             **kwargs) -> Report:
    """Model ``fun(*args, **kwargs)`` on ``chip`` from shapes only; see the module doc."""
    jitted = api.jit(fun, chip=chip, precision=precision, static_argnums=static_argnums,
                     static_argnames=static_argnames)
    statics = jitted._signature
    args = [a if i in statics.static_argnums else jax.tree.map(_as_struct, a)
            for i, a in enumerate(args)]
    kwargs = {k: v if k in statics.static_argnames else jax.tree.map(_as_struct, v)
              for k, v in kwargs.items()}
    lowered = jitted.lower(*args, **kwargs)
    module, memory = lowered.optimize()
    return Report(lowered.chip, module, program_cost(module, lowered.chip), memory, lowered.precision)
