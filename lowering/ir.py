"""The MTIA IR: a small SSA IR of tensors and ops, printable as text.

A ``Module`` is one function: parameters, a straight-line list of ``Op``s and
outputs. Every ``Op`` names its kind, its operand and result ``Value``s, its
attributes and the user source line it came from. A *generic* op carries the
JAX primitive and its params in ``attrs`` (``primitive``, ``params``), so its
host numerics are just ``primitive.bind(*operands, **params)``; MTIA-specific
ops (added by later passes) carry their own attributes.
"""

from __future__ import annotations

import math
import dataclasses
import functools
import itertools
from typing import Any

import numpy as np
from jax import dtypes as jax_dtypes

from mtia_jax.mx import MXType


@dataclasses.dataclass(frozen=True)
class SourceLoc:
    """Where in the user's program an op came from."""

    file: str
    line: int
    function: str = "?"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.function})"


@dataclasses.dataclass(frozen=True)
class TensorType:
    """Shape, element type and memory space of a tensor value.

    ``dtype`` is a NumPy/ml_dtypes dtype, an :class:`mtia_jax.mx.MXType`, or
    a JAX extended dtype (a PRNG key type such as ``key<fry>``, stored as its
    underlying uint32 words).
    """

    shape: tuple[int, ...]
    dtype: Any
    space: str = "hbm"

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: no overflow past 2**63

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in memory (MX types and sub-byte element
        types counted packed)."""
        bits = element_bits(self.dtype)
        if isinstance(bits, int):
            return -(-self.size * bits // 8)
        return int(np.ceil(self.size * bits / 8))

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{dtype_name(self.dtype)}[{dims}]"


# element types narrower than a byte: NumPy holds one per byte, the chip
# stores them packed (MX elements, int4 weights)
SUB_BYTE_BITS = {"float4_e2m1fn": 4, "float6_e2m3fn": 6, "float6_e3m2fn": 6, "int4": 4, "uint4": 4,
                 "int2": 2, "uint2": 2}


_SHORT_DTYPE = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64",
    "bool": "bool", "complex64": "c64", "complex128": "c128",
}


@functools.lru_cache(maxsize=None)
def is_extended(dtype: Any) -> bool:
    """True for JAX extended dtypes (PRNG keys), which NumPy cannot represent."""
    if isinstance(dtype, (np.dtype, MXType)):
        return False
    try:
        return jax_dtypes.issubdtype(dtype, jax_dtypes.extended)
    except TypeError:
        return False


@functools.lru_cache(maxsize=None)
def element_bits(dtype: Any) -> int | float:
    """Bits one element of ``dtype`` occupies in memory: packed for MX types
    (their shared scales included: a fraction) and sub-byte types; a PRNG
    key's words x 32."""
    if isinstance(dtype, MXType):
        return dtype.bits_per_element
    if is_extended(dtype):
        return 8 * int(dtype.itemsize)
    return SUB_BYTE_BITS.get(np.dtype(dtype).name, 8 * np.dtype(dtype).itemsize)


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: Any) -> str:
    if isinstance(dtype, MXType) or is_extended(dtype):
        return str(dtype)
    name = np.dtype(dtype).name
    return _SHORT_DTYPE.get(name, name)


class Value:
    """An SSA value: produced once, by a parameter or an op result."""

    __slots__ = ("id", "type")
    _ids = itertools.count()

    def __init__(self, type: TensorType):
        self.id = next(Value._ids)
        self.type = type

    def __repr__(self) -> str:
        return f"Value(%{self.id}: {self.type})"


@dataclasses.dataclass(eq=False)
class Op:
    """One operation. ``kind`` selects its numerics and its cost rule."""

    kind: str
    operands: list[Value]
    results: list[Value]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: SourceLoc | None = None
    # nested functions of region ops (scan body, while cond/body, cond branches)
    regions: dict[str, "Module"] = dataclasses.field(default_factory=dict)

    @property
    def primitive(self):
        return self.attrs.get("primitive")

    @property
    def params(self) -> dict[str, Any]:
        return self.attrs.get("params", {})


@dataclasses.dataclass(eq=False)
class Module:
    """One function in MTIA IR."""

    name: str
    params: list[Value]
    ops: list[Op]
    outputs: list[Value]
    # for a per-device program: the mesh and the placements of its inputs and
    # outputs (``lowering.passes.partition.SpmdLayout``); None otherwise
    layout: Any = None

    def as_text(self) -> str:
        return print_module(self)

    def producers(self) -> dict[Value, Op]:
        return {r: op for op in self.ops for r in op.results}


# ---------------------------------------------------------------- printing

def print_module(module: Module) -> str:
    return "\n".join(_module_lines(module, {}, ""))


def _module_lines(module: Module, names: dict[Value, str], indent: str) -> list[str]:
    def name(v: Value) -> str:
        if v not in names:
            names[v] = f"%{len(names)}"
        return names[v]

    params = ", ".join(f"{name(p)}: {p.type}" for p in module.params)
    lines = [f"{indent}func @{module.name}({params}) {{"]
    for op in module.ops:
        results = ", ".join(name(r) for r in op.results)
        operands = ", ".join(name(o) for o in op.operands)
        attrs = _format_attrs(op)
        types = ", ".join(str(r.type) for r in op.results)
        text = f"{indent}  {results} = {op.kind}({operands}){attrs} : {types}"
        if op.source is not None:
            text += f"  # {op.source}"
        lines.append(text)
        for region in op.regions.values():
            lines.extend(_module_lines(region, names, indent + "    "))
    outs = ", ".join(name(o) for o in module.outputs)
    lines.append(f"{indent}  return {outs}")
    lines.append(f"{indent}}}")
    return lines


# op kinds whose ``params`` are not printed: they hold whole jaxprs (a Pallas
# kernel's body and index maps); the op's own attrs say what matters
UNPRINTED_PARAMS = frozenset({"pallas_call"})


def _format_attrs(op: Op) -> str:
    items = []
    for key, val in op.attrs.items():
        if key == "primitive":
            continue
        if key == "params":
            if op.kind in UNPRINTED_PARAMS:
                continue
            items.extend(f"{k}={_format_value(v)}" for k, v in val.items() if v is not None)
        else:
            items.append(f"{key}={_format_value(val)}")
    return (" {" + ", ".join(items) + "}") if items else ""


def _format_value(val: Any) -> str:
    if isinstance(val, np.ndarray):
        if val.size <= 4:
            return np.array2string(val, separator=",").replace("\n", "")
        return f"<{dtype_name(val.dtype)}{list(val.shape)}>"
    if isinstance(val, np.dtype) or (isinstance(val, type) and issubclass(val, np.generic)):
        return dtype_name(val)
    if isinstance(val, (tuple, list)):
        inner = ",".join(_format_value(v) for v in val)
        return f"({inner})"
    return str(val)


def verify(module: Module) -> None:
    """Raise ``ValueError`` unless every op (in regions too) reads only values
    defined before it, and every output is defined: what every pass must keep."""
    defined = set(module.params)
    for op in module.ops:
        missing = [v for v in op.operands if v not in defined]
        if missing:
            raise ValueError(f"'{op.kind}' at {op.source} reads {missing} before it is defined")
        defined.update(op.results)
        for region in op.regions.values():
            verify(region)
    if any(v not in defined for v in module.outputs):
        raise ValueError(f"module @{module.name} returns a value it never defines")
