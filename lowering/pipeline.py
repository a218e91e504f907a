"""The pass pipeline: an ordered list of passes, each ``run(module, ctx)``.

Set ``MTIA_JAX_DUMP_IR=<dir>`` to write the IR after import and after every
pass to ``<dir>/<module>.<NN>.<pass>.ir.txt``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from types import ModuleType
from typing import Any

from lowering.ir import Module
from lowering.passes import (attention, canonicalize, collective_algorithms, combine_collectives,
                             fusion, inplace, partition, precision, prologue, tiling, trip_counts)

PASSES: tuple[ModuleType, ...] = (canonicalize, trip_counts, partition, combine_collectives, attention,
                                  precision, fusion, prologue, tiling, collective_algorithms, inplace)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What passes may consult: the target chip, and user options."""

    chip: Any
    precision: Any = None  # a mtia_jax.PrecisionPolicy, or None
    # SPMD: {mesh axis: size}, and one spec (mesh axis or None per dim) per
    # flat input and output (None: unconstrained); see passes/partition.py
    mesh: Any = None
    scale_out_axes: tuple = ()  # mesh axes across scale-up domains (mtia_jax.make_mesh)
    in_specs: Any = None
    out_specs: Any = None
    donated: frozenset = frozenset()  # flat indices of donated parameters
    # per flat parameter: the names precision rules match (``(arg/path, path)`` or
    # ``(arg,)``; see mtia_jax.precision.PrecisionPolicy.rules); None: unknown
    param_names: Any = None


def pass_name(p: ModuleType) -> str:
    return p.__name__.rsplit(".", 1)[-1]


def run_passes(module: Module, ctx: PassContext, passes=PASSES) -> Module:
    dump_dir = os.environ.get("MTIA_JAX_DUMP_IR")
    _dump(dump_dir, module, 0, "import")
    for number, p in enumerate(passes, start=1):
        layout = module.layout
        module = p.run(module, ctx)
        if module.layout is None and layout is not None:  # a pass that rebuilt the module
            module = dataclasses.replace(module, layout=layout)
        _dump(dump_dir, module, number, pass_name(p))
    return module


def _dump(dump_dir: str | None, module: Module, number: int, stage: str) -> None:
    if not dump_dir:
        return
    path = pathlib.Path(dump_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{module.name}.{number:02d}.{stage}.ir.txt").write_text(module.as_text() + "\n")
