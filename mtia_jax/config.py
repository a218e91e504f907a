"""Runtime options, in the style of ``jax.config``.

    mtia_jax.config.update("debug_nans", True)
    mtia_jax.config.debug_nans                      # -> True
    with mtia_jax.config.override(debug_nans=True):
        ...

Every option has a default, a type and an environment variable that sets its
initial value (``MTIA_JAX_DEBUG_NANS=1``). Options are read when a compiled
program is called, so changing one takes effect at the next call without
recompiling. ``override`` changes the process-wide value for the duration of
the ``with`` block (it is not thread-local).

Options:

- ``debug_nans`` (bool, default False): check every kernel's floating-point
  results for NaN and raise ``FloatingPointError`` naming the first kernel
  that produced one, its op path and your source line. Eager mode checks
  kernel by kernel; graph mode checks the program's outputs and, if one
  holds a NaN, re-runs the call kernel by kernel to find the culprit.
- ``debug_infs`` (bool, default False): the same for +-Inf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from typing import Any, Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Any
    env: str
    parse: Callable[[Any], Any]  # user or environment value -> checked value
    help: str


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
    elif isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected a boolean (True/False, 1/0), got {value!r}")


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("debug_nans", False, "MTIA_JAX_DEBUG_NANS", _bool,
           "raise FloatingPointError at the first kernel that produces a NaN"),
    Option("debug_infs", False, "MTIA_JAX_DEBUG_INFS", _bool,
           "raise FloatingPointError at the first kernel that produces an Inf"),
)}


def _initial(option: Option) -> Any:
    text = os.environ.get(option.env)
    if text is None:
        return option.default
    try:
        return option.parse(text)
    except ValueError as e:
        raise ValueError(f"${option.env}={text!r}: {e}") from None


# Current values. Read directly by the runtime on the call path (a dict
# lookup); change them only through ``update`` / ``override``.
_values: dict[str, Any] = {name: _initial(o) for name, o in OPTIONS.items()}


def _option(name: str) -> Option:
    try:
        return OPTIONS[name]
    except KeyError:
        raise ValueError(f"mtia_jax.config: unknown option {name!r}; valid options: "
                         f"{', '.join(sorted(OPTIONS))}") from None


def _checked(name: str, value: Any) -> Any:
    try:
        return _option(name).parse(value)
    except ValueError as e:
        if str(e).startswith("mtia_jax.config"):
            raise
        raise ValueError(f"mtia_jax.config: option {name!r}: {e}") from None


def update(name: str, value: Any) -> None:
    """Set option ``name`` to ``value`` (like ``jax.config.update``)."""
    _values[name] = _checked(name, value)


def read(name: str) -> Any:
    """The current value of option ``name``."""
    _option(name)
    return _values[name]


def values() -> dict[str, Any]:
    """A copy of every option's current value."""
    return dict(_values)


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[None]:
    """Set options for the duration of a ``with`` block, then restore them."""
    checked = {name: _checked(name, value) for name, value in changes.items()}
    saved = {name: _values[name] for name in checked}
    _values.update(checked)
    try:
        yield
    finally:
        _values.update(saved)


def __getattr__(name: str) -> Any:
    # ``mtia_jax.config.debug_nans``: options read as module attributes
    if name in OPTIONS:
        return _values[name]
    raise AttributeError(f"module 'mtia_jax.config' has no attribute {name!r}; options: "
                         f"{', '.join(sorted(OPTIONS))}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(OPTIONS))


class _ConfigModule(types.ModuleType):
    """Makes ``mtia_jax.config.debug_nans = True`` a checked ``update``, and
    ``mtia_jax.config.debug_nan = True`` (a typo) an ``AttributeError``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTIONS:
            update(name, value)
        elif name.startswith("_") or name in self.__dict__:
            super().__setattr__(name, value)
        else:  # a typo would otherwise set nothing, silently
            raise AttributeError(f"mtia_jax.config has no option {name!r}; options: "
                                 f"{', '.join(sorted(OPTIONS))}")


sys.modules[__name__].__class__ = _ConfigModule
