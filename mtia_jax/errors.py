"""Errors raised to users. Each names the user's source line and says what to do."""

from __future__ import annotations

from typing import Any, Sequence


def _where(source: Any) -> str:
    return f" at {source}" if source is not None else ""


class UnsupportedOperationError(NotImplementedError):
    """A JAX primitive with no MTIA lowering rule, or (with ``advice``) a
    feature of a supported primitive that is not supported (``primitive``
    then names it, e.g. "pallas_call with scalar prefetch")."""

    def __init__(self, primitive: str, source: Any = None, advice: str | None = None):
        self.primitive = primitive
        self.source = source
        self.advice = advice
        if advice is None:
            message = (
                f"mtia_jax.jit: the JAX primitive '{primitive}'{_where(source)} has no MTIA "
                f"lowering yet. Rewrite that line with supported operations, run it outside "
                f"mtia_jax.jit, or see lowering.from_jaxpr.supported_primitives() for the list.")
        else:
            message = f"mtia_jax.jit: {primitive}{_where(source)} is not supported. To fix it, {advice}."
        super().__init__(message)


class MTIAHostFallbackWarning(UserWarning):
    """An op with no MTIA kernel runs on the host CPU (the round trip over the
    host link is modeled). Raised once per (primitive, user source line)."""


class UnmeasuredLoopWarning(UserWarning):
    """A while loop whose trip count depends on data, was not measured (the
    program has not run) and was not given (``estimate(..., loop_trips=)``):
    it is modeled at one trip per execution."""


class HBMCapacityError(MemoryError):
    """The program's live buffers do not fit the chip's HBM."""

    def __init__(self, chip: str, peak_bytes: int, capacity_bytes: float,
                 largest: Sequence[tuple[str, int, Any]]):
        self.chip = chip
        self.peak_bytes = peak_bytes
        self.capacity_bytes = capacity_bytes
        rows = "\n".join(
            f"  {nbytes / 2**30:10.3f} GiB  {what}{_where(source)}" for what, nbytes, source in largest
        )
        super().__init__(
            f"mtia_jax.jit: the program needs {peak_bytes / 2**30:.3f} GiB of HBM at its peak but "
            f"{chip} has {capacity_bytes / 2**30:.3f} GiB. The largest buffers live at that point:\n{rows}\n"
            f"Shrink the batch or model, use MX weights, or shard over a mesh."
        )


class PallasBlockError(ValueError):
    """A Pallas kernel's blocks, double-buffered, do not fit the on-chip
    memory one processing element has."""

    def __init__(self, kernel: str, chip: str, need_bytes: int, capacity_bytes: int,
                 blocks: Sequence[tuple[str, tuple, int]], source: Any = None):
        self.kernel = kernel
        self.need_bytes = need_bytes
        self.capacity_bytes = capacity_bytes
        rows = "\n".join(f"  {name}: block {tuple(shape)}, {nbytes / 2**10:.1f} KiB"
                         for name, shape, nbytes in blocks)
        super().__init__(
            f"mtia_jax.jit: the Pallas kernel '{kernel}'{_where(source)} needs "
            f"{need_bytes / 2**10:.1f} KiB of on-chip memory per processing element (every "
            f"BlockSpec's block twice, for double buffering, plus scratch) but {chip} has "
            f"{capacity_bytes / 2**10:.1f} KiB per processing element (its local memory and its "
            f"share of the SRAM). The blocks:\n{rows}\nUse smaller block shapes in the BlockSpecs.")
