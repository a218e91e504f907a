"""Pallas kernels on MTIA: compiler parameters and autotuning.

A ``jax.experimental.pallas.pallas_call`` inside ``mtia_jax.jit`` runs in
Pallas's interpret mode on the host (bit-equal to ``jax.jit`` of the same
kernel with ``interpret=True``) and is modeled from its grid, BlockSpecs and
body (``runtime/pallas_cost.py``). Grid dimensions marked "parallel" in
``CompilerParams(dimension_semantics=...)`` spread over the chip's
processing elements; "arbitrary" ones (the default) run in order on one.

``autotune(kernel_factory, configs, *example_args, chip=...)`` models every
candidate configuration from shapes and returns the fastest with the table
of all, as the MTIA stack autotunes its Triton kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import mtia_jax
from mtia_jax import chips as chip_catalogue
from mtia_jax.errors import PallasBlockError

SEMANTICS = ("parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class CompilerParams:
    """MTIA compiler parameters of a ``pallas_call`` (``compiler_params=``):
    per grid dimension, "parallel" (iterations independent: spread over the
    processing elements) or "arbitrary" (run in order: a reduction over
    blocks). ``jax.experimental.pallas.tpu.CompilerParams`` is read the same
    way."""

    PLATFORM = "mtia"
    dimension_semantics: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [s for s in self.dimension_semantics if s not in SEMANTICS]
        if bad:
            raise ValueError(f"CompilerParams: dimension_semantics {bad} are not among {SEMANTICS}")
        object.__setattr__(self, "dimension_semantics", tuple(self.dimension_semantics))


@dataclasses.dataclass(frozen=True)
class Candidate:
    config: dict
    time_s: float | None      # modeled; None when the configuration does not run
    roofline_time_s: float | None
    note: str = ""            # why it does not run


@dataclasses.dataclass(frozen=True)
class AutotuneResult:
    chip: str
    candidates: tuple[Candidate, ...]

    @property
    def ranked(self) -> tuple[Candidate, ...]:
        ok = sorted((c for c in self.candidates if c.time_s is not None), key=lambda c: c.time_s)
        return tuple(ok) + tuple(c for c in self.candidates if c.time_s is None)

    @property
    def best(self) -> Candidate:
        best = self.ranked[0]
        if best.time_s is None:
            raise ValueError("autotune: no candidate configuration runs:\n" + self.table())
        return best

    @property
    def config(self) -> dict:
        return self.best.config

    def table(self) -> str:
        """Every candidate, fastest first (modeled on the chip)."""
        rows = [(", ".join(f"{k}={v}" for k, v in c.config.items()),
                 f"{c.time_s * 1e6:.2f}" if c.time_s is not None else "-",
                 f"{c.roofline_time_s / c.time_s:.2f}" if c.time_s else "-", c.note)
                for c in self.ranked]
        head = ("config", "modeled us", "efficiency", "")
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(3)]
        lines = [f"autotune on {self.chip} (times modeled, not measured); best: {rows[0][0]}",
                 f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}"]
        lines += [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
                  for r in rows]
        return "\n".join(lines)

    __str__ = table


def autotune(kernel_factory: Callable[..., Callable], configs: Sequence[dict], *example_args,
             chip=None, **estimate_kwargs) -> AutotuneResult:
    """Model ``kernel_factory(**config)(*example_args)`` on ``chip`` for every
    config (from shapes: arguments may be ``jax.ShapeDtypeStruct``s) and rank
    them. A config whose blocks do not fit on chip, or do not divide the
    arrays, is listed with the reason instead of a time."""
    if not configs:
        raise ValueError("autotune: give at least one configuration")
    spec = chip_catalogue.get(chip) if chip is not None else chip_catalogue.default()
    candidates = []
    for config in configs:
        try:
            report = mtia_jax.estimate(kernel_factory(**config), *example_args, chip=spec, **estimate_kwargs)
        except (PallasBlockError, ValueError) as error:
            candidates.append(Candidate(dict(config), None, None, str(error).splitlines()[0][:160]))
            continue
        candidates.append(Candidate(dict(config), report.time_s, report.roofline_time_s))
    return AutotuneResult(spec.name, tuple(candidates))


__all__ = ["CompilerParams", "autotune", "AutotuneResult", "Candidate", "SEMANTICS"]
