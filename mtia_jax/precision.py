"""Precision policies: which MX formats a program's matmuls run in.

    policy = mtia_jax.PrecisionPolicy(weights="mxfp4", activations="mxfp8")
    mtia_jax.jit(f, precision=policy)          # or
    with mtia_jax.precision_policy(policy):    # applies to jit/estimate inside
        ...

The dtype pass (``lowering.passes.precision``) rewrites each ``dot_general``
with a parameter (weight) operand into an ``mx_matmul`` with the policy's
formats, gives ``swiglu`` and ``moe_ffn`` kernels with weight operands the
same formats, and ``flash_attention`` and ``paged_attention`` the KV-cache
format, with no change to user code.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

from mtia_jax import mx


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Formats for matmul operands.

    Attributes:
      weights: MX format for the weight operand (an argument of the program),
        e.g. ``"mxfp4"``/``"mx4"``; ``None`` keeps the weight's dtype.
      activations: MX format for the other operand; ``None`` keeps its dtype.
      accum: accumulation dtype (MX dot products accumulate in float32).
      attention: also rewrite matmuls whose operands are both activations
        (attention scores and values); off by default.
      kv_cache: MX format of the keys and values ``flash_attention`` and
        ``paged_attention`` read (a KV cache stored in MX, e.g. ``"mx8"``);
        ``None`` keeps their dtype.
    """

    weights: str | None = None
    activations: str | None = None
    accum: str = "float32"
    attention: bool = False
    kv_cache: str | None = None

    def __post_init__(self):
        for field in ("weights", "activations", "kv_cache"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, mx.get_format(value).name)
        if self.accum != "float32":
            raise ValueError(f"PrecisionPolicy: accum={self.accum!r} is not supported; MX dot "
                             f"products accumulate in 'float32' (OCP MX v1.0 §6.2)")

    def __str__(self) -> str:
        kv = f", kv_cache={self.kv_cache}" if self.kv_cache else ""
        return (f"weights={self.weights or 'unchanged'}, activations={self.activations or 'unchanged'}, "
                f"accum={self.accum}{', attention' if self.attention else ''}{kv}")


_ACTIVE: contextvars.ContextVar[PrecisionPolicy | None] = contextvars.ContextVar(
    "mtia_jax_precision_policy", default=None)


@contextlib.contextmanager
def precision_policy(policy: PrecisionPolicy | None = None, **fields):
    """Apply ``policy`` (or ``PrecisionPolicy(**fields)``) to every
    ``mtia_jax.jit``/``estimate`` compiled inside the block."""
    if policy is None:
        policy = PrecisionPolicy(**fields)
    elif fields:
        raise TypeError("precision_policy: pass a PrecisionPolicy or its fields, not both")
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def resolve(policy: PrecisionPolicy | None) -> PrecisionPolicy | None:
    """The explicit policy if given, else the one of the enclosing ``precision_policy`` block."""
    if policy is not None and not isinstance(policy, PrecisionPolicy):
        raise TypeError(f"precision= takes a mtia_jax.PrecisionPolicy, got {type(policy).__name__}")
    return policy if policy is not None else _ACTIVE.get()
