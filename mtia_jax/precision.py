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

Per-group rules pick a weight's format by the parameter it comes from::

    policy = mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8",
                                      rules=(("layers/w_down", "mx8"), ("lm_head", None)))

``mtia_jax.precision_search`` measures what quantizing one parameter group
at a time does to a loss (``sensitivity``) and picks per-group formats that
minimise modeled latency under a loss budget (``search``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
from collections.abc import Mapping

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
      rules: per-group weight formats: ``(pattern, format)`` pairs (or a
        dict), e.g. ``(("layers/w_down", "mx8"), ("lm_head", None))``. A
        weight operand takes the format of the first rule whose pattern
        matches the *parameter path* of the program argument it comes from,
        else ``weights``; a format of ``None`` keeps the weight's dtype.
        Patterns are ``fnmatch`` globs (case-sensitive; ``*`` also crosses
        ``/``) over the ``/``-joined pytree keys of the argument, e.g.
        ``layers/wq``, ``embed``, ``bottom_mlp/0/w`` for ``f(params, x)``
        with ``params = {"layers": {"wq": ...}, ...}``; the path prefixed
        with the function's parameter name (``params/layers/wq``) matches
        too, and an argument that is a bare array is named by its parameter
        name alone (``w1`` in ``f(x, w1, w2)``). A weight reached through
        views, ``convert_element_type``, slices or a ``lax.scan``'s consts
        or ``xs`` keeps its path, so layers stacked along a leading axis
        and scanned over form one group per parameter name
        (``layers/w_down`` is every layer's ``w_down``): a rule cannot pick
        one layer index of a stacked parameter. Rules apply to weight
        operands only; ``activations`` and ``kv_cache`` stay global.
    """

    weights: str | None = None
    activations: str | None = None
    accum: str = "float32"
    attention: bool = False
    kv_cache: str | None = None
    rules: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self):
        for field in ("weights", "activations", "kv_cache"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, mx.get_format(value).name)
        if self.accum != "float32":
            raise ValueError(f"PrecisionPolicy: accum={self.accum!r} is not supported; MX dot "
                             f"products accumulate in 'float32' (OCP MX v1.0 §6.2)")
        object.__setattr__(self, "rules", _check_rules(self.rules))

    def __str__(self) -> str:
        kv = f", kv_cache={self.kv_cache}" if self.kv_cache else ""
        rules = ""
        if self.rules:
            rules = ", rules=[" + ", ".join(f"{p}: {f or 'unchanged'}" for p, f in self.rules) + "]"
        return (f"weights={self.weights or 'unchanged'}, activations={self.activations or 'unchanged'}, "
                f"accum={self.accum}{', attention' if self.attention else ''}{kv}{rules}")

    def weight_format(self, names) -> str | None:
        """The format of a weight whose program argument is named ``names``
        (one path string, or several candidate names of one argument, as
        ``Lowered.param_names`` gives per input): the first rule matching any name, else
        ``weights``."""
        if isinstance(names, str):
            names = (names,)
        for pattern, fmt in self.rules:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return fmt
        return self.weights

    @property
    def weight_formats(self) -> frozenset:
        """Every format a weight operand may get (``weights`` and the rules')."""
        return frozenset({self.weights, *(f for _, f in self.rules)})

    @property
    def changes_matmuls(self) -> bool:
        """Whether any matmul operand may get an MX format."""
        return self.activations is not None or any(f is not None for f in self.weight_formats)


def _check_rules(rules) -> tuple[tuple[str, str | None], ...]:
    """``rules`` as a tuple of (pattern, canonical format name or None) pairs,
    or a ValueError/TypeError that says which rule is wrong."""
    if rules is None:
        return ()
    if isinstance(rules, Mapping):
        rules = tuple(rules.items())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
        raise TypeError(f"PrecisionPolicy: rules must be a tuple of (pattern, format) pairs "
                        f"(or a dict), got {type(rules).__name__} {rules!r}")
    checked = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise TypeError(f"PrecisionPolicy: rules[{i}] = {rule!r} is not a (pattern, format) pair, "
                            f"e.g. ('layers/w_down', 'mx8') or ('lm_head', None)")
        pattern, fmt = rule
        _check_pattern(i, pattern)
        if fmt is not None:
            if not isinstance(fmt, (str, mx.MXFormat, mx.MXType)):
                raise TypeError(f"PrecisionPolicy: rules[{i}] ({pattern!r}): the format must be an MX "
                                f"format name or None (keep the dtype), got {fmt!r}")
            try:
                fmt = mx.get_format(fmt).name
            except ValueError as error:
                raise ValueError(f"PrecisionPolicy: rules[{i}] ({pattern!r}): {error}") from None
        checked.append((pattern, fmt))
    return tuple(checked)


def _check_pattern(i: int, pattern) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"PrecisionPolicy: rules[{i}]: the pattern must be a string (a glob over "
                        f"'/'-joined parameter paths such as 'layers/wq'), got {pattern!r}")
    problem = None
    if not pattern.strip():
        problem = "is empty"
    elif pattern != pattern.strip():
        problem = "has leading or trailing spaces"
    elif pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        problem = "has an empty path component (paths are keys joined by '/', e.g. 'layers/wq')"
    elif pattern.count("[") != pattern.count("]"):
        problem = "has an unbalanced '[' (a glob character class)"
    if problem is not None:
        raise ValueError(f"PrecisionPolicy: rules[{i}] pattern {pattern!r} {problem}")


def path_string(keypath) -> str:
    """A pytree key path as ``/``-joined keys: ``layers/wq``, ``bottom_mlp/0/w``."""
    parts = []
    for key in keypath:
        for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (FlattenedIndexKey: key)
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


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
