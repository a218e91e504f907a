"""The chip catalogue: one :class:`ChipSpec` per modelled accelerator.

Every constant the performance model uses (peak FLOP/s per compute class,
memory sizes and bandwidths, PE grid, launch overhead, scale-up network) comes
from here, and every number carries its source in ``ChipSpec.sources``:

* ``P [KEY]`` / ``S [KEY]`` - published (primary) or secondary value; the keys
  are those of ``shared/reference/hardware-facts.md`` section 0.
* ``derived: ...`` - arithmetic on published values; the formula is given.
* ``assumption: ...`` - a parameter no vendor has published, chosen for the
  model with the reasoning given (mostly scaled from MTIA 2i, the newest MTIA
  with a published micro-architecture).
* ``user override`` - set through :meth:`ChipSpec.replace`.

Compute classes
---------------
The matrix engine (``peak_flops``) is rated per compute class:
``fp32``, ``bf16`` (also FP16), ``fp8``, ``mx8``, ``mx6``, ``mx4``, ``int8``.
A class a chip has no native datapath for is absent from its ``peak_flops``;
:meth:`ChipSpec.matmul_peak` then falls back along a fixed chain (the format is
emulated on a wider datapath)::

    mx4 -> mx6 -> mx8 -> fp8 -> bf16 -> fp32
    int8 -> fp8 -> bf16 -> fp32

The vector/SIMD units (``vector_flops``, elementwise ops and reductions) are
rated for ``fp32``, ``bf16`` and ``int8``. Narrow floating formats (fp8 and
the MX formats) are assumed to be upcast to bf16 for elementwise work, and
int8 falls back to bf16 where a chip has no int8 vector rate.

:func:`compute_class` maps a dtype (NumPy, ml_dtypes, ``jax.numpy``, an MX
format name, or an object with a ``dtype``/``format`` attribute) to a class.
Wide integers and float64 are assumed to run at the fp32 rate; no catalogued
chip publishes an FP64 or INT32 matrix rate.

Registry
--------
:func:`names`, :func:`get`, :func:`register`, :func:`default`,
:func:`default_name`. The default chip is ``mtia450`` unless the environment
variable ``MTIA_JAX_CHIP`` names another one.
"""

from __future__ import annotations

import dataclasses
import functools
import enum
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "ChipSpec",
    "FrozenMapping",
    "DEFAULT_CHIP",
    "ENV_VAR",
    "MATMUL_CLASSES",
    "VECTOR_CLASSES",
    "UNITS",
    "NUMERIC_FIELDS",
    "FRACTION_FIELDS",
    "MX_FORMATS",
    "MATMUL_FALLBACK",
    "VECTOR_FALLBACK",
    "SUMMARY_COLUMNS",
    "compute_class",
    "names",
    "get",
    "register",
    "specs",
    "default",
    "default_name",
    "summary_table",
]

DEFAULT_CHIP = "mtia450"
ENV_VAR = "MTIA_JAX_CHIP"

# Compute classes of the matrix engine and of the vector units.
MATMUL_CLASSES = ("fp32", "bf16", "fp8", "mx8", "mx6", "mx4", "int8")
VECTOR_CLASSES = ("fp32", "bf16", "int8")

# Dedicated units the cost model knows how to use.
UNITS = ("flash_attention", "moe_ffn", "near_memory_reduce", "mx_matmul")

# Fields that hold a number; each needs an entry in ``sources``.
NUMERIC_FIELDS = (
    "hbm_bytes",
    "hbm_bandwidth",
    "hbm_random_access_efficiency",
    "sram_bytes",
    "sram_bandwidth",
    "pe_rows",
    "pe_cols",
    "pe_local_bytes",
    "clock_hz",
    "tdp_watts",
    "host_link_bandwidth",
    "host_link_latency_s",
    "scaleup_domain",
    "scaleup_link_bandwidth",
    "scaleup_link_latency_s",
    "scaleup_links",
    "scaleup_message_s",
    "scaleout_bandwidth",
    "scaleout_latency_s",
    "kernel_launch_s",
    "matmul_efficiency",
    "hbm_efficiency",
    "collective_efficiency",
)
# Scale-up fabrics: "switched" (every device one switch hop from every other:
# any device can send to several at once, up to one message per link) or
# "ring" (each device links to two neighbours only: messages to others are
# forwarded hop by hop).
TOPOLOGIES = ("switched", "ring")
# Numeric fields that are fractions in (0, 1].
FRACTION_FIELDS = (
    "hbm_random_access_efficiency",
    "matmul_efficiency",
    "hbm_efficiency",
    "collective_efficiency",
)
_INT_FIELDS = frozenset(
    {"hbm_bytes", "sram_bytes", "pe_rows", "pe_cols", "pe_local_bytes", "scaleup_domain", "scaleup_links"}
)

# Display unit of every numeric field (used by describe_rows()).
_FIELD_UNITS = {
    "hbm_bytes": "B",
    "hbm_bandwidth": "B/s",
    "hbm_random_access_efficiency": "",
    "sram_bytes": "B",
    "sram_bandwidth": "B/s",
    "pe_rows": "",
    "pe_cols": "",
    "pe_local_bytes": "B",
    "clock_hz": "Hz",
    "tdp_watts": "W",
    "host_link_bandwidth": "B/s",
    "host_link_latency_s": "s",
    "scaleup_domain": "devices",
    "scaleup_link_bandwidth": "B/s",
    "scaleup_link_latency_s": "s",
    "scaleup_links": "links",
    "scaleup_message_s": "s",
    "scaleout_bandwidth": "B/s",
    "scaleout_latency_s": "s",
    "kernel_launch_s": "s",
    "matmul_efficiency": "",
    "hbm_efficiency": "",
    "collective_efficiency": "",
}

# OCP MX format names (and short aliases) -> compute class.
MX_FORMATS = {
    "mxfp8_e4m3": "mx8",
    "mxfp8_e5m2": "mx8",
    "mxfp6_e3m2": "mx6",
    "mxfp6_e2m3": "mx6",
    "mxfp4_e2m1": "mx4",
    "mxint8": "int8",
    "mxfp8": "mx8",
    "mxfp6": "mx6",
    "mxfp4": "mx4",
    "mx8": "mx8",
    "mx6": "mx6",
    "mx4": "mx4",
}

# Matmul fallback: the first class in the chain that the chip rates is used.
MATMUL_FALLBACK = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp32"),
    "fp8": ("fp8", "bf16", "fp32"),
    "mx8": ("mx8", "fp8", "bf16", "fp32"),
    "mx6": ("mx6", "mx8", "fp8", "bf16", "fp32"),
    "mx4": ("mx4", "mx6", "mx8", "fp8", "bf16", "fp32"),
    "int8": ("int8", "fp8", "bf16", "fp32"),
}

# Vector fallback (assumption: fp8/MX elements are upcast to bf16 for
# elementwise work; the vector units have no fp8/MX lanes in the model).
VECTOR_FALLBACK = {
    "fp32": ("fp32",),
    "bf16": ("bf16", "fp32"),
    "int8": ("int8", "bf16", "fp32"),
    "fp8": ("bf16", "fp32"),
    "mx8": ("bf16", "fp32"),
    "mx6": ("bf16", "fp32"),
    "mx4": ("bf16", "fp32"),
}

# String spellings accepted besides the class names and the MX names.
_STRING_ALIASES = {
    "f32": "fp32",
    "float32": "fp32",
    "f64": "fp32",
    "float64": "fp32",
    "tf32": "fp32",
    "fp16": "bf16",
    "f16": "bf16",
    "float16": "bf16",
    "half": "bf16",
    "bfloat16": "bf16",
    "fp4": "mx4",
    "fp6": "mx6",
    "i8": "int8",
    "u8": "int8",
}


# --------------------------------------------------------------------------
# A read-only, hashable, picklable mapping
# --------------------------------------------------------------------------


class FrozenMapping(Mapping):
    """An immutable ``dict`` view that is hashable and picklable.

    (``types.MappingProxyType`` is neither, which would make ``ChipSpec``
    unusable as a jit static argument or a cache key.)
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping | Iterable = ()):
        object.__setattr__(self, "_data", dict(data))
        object.__setattr__(self, "_hash", None)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(frozenset(self._data.items())))
        return self._hash

    def __eq__(self, other):
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __setattr__(self, name, value):
        raise AttributeError("FrozenMapping is read-only")

    def __reduce__(self):
        return (type(self), (self._data,))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"


# --------------------------------------------------------------------------
# compute_class
# --------------------------------------------------------------------------


def _class_from_dtype_name(name: str) -> str | None:
    """Class for a NumPy / ml_dtypes dtype name, or None if not a dtype name."""
    if name in ("bfloat16", "float16"):
        return "bf16"
    if name.startswith("float8_"):  # every ml_dtypes FP8 (and the E8M0 scale)
        return "fp8"
    if name.startswith("float6_"):  # bare MX6 elements
        return "mx6"
    if name.startswith("float4_"):  # bare MX4 elements
        return "mx4"
    if name in ("int8", "uint8", "bool", "int4", "uint4", "int2", "uint2"):
        return "int8"
    if name.startswith(("float", "complex", "longdouble", "clongdouble")):
        return "fp32"  # float32/64/128 and complex: assumed at the fp32 rate
    if name.startswith(("int", "uint")):
        return "fp32"  # int16/32/64: assumed at the fp32 rate
    return None


def compute_class(dtype: Any) -> str:
    """Map a dtype to the compute class used to look up peak rates.

    Accepts a NumPy/ml_dtypes dtype or scalar type, a ``jax.numpy`` dtype
    (``jnp.bfloat16``), a compute-class name (``"bf16"``), an OCP MX format
    name (``"mxfp4_e2m1"``, ``"mx4"``), or an object with a ``format``
    attribute (an MX type) or a ``dtype`` attribute (an array or
    ``jax.ShapeDtypeStruct``).

    float32/float64/complex and integers wider than 8 bits -> ``"fp32"``
    (assumption: wide-integer and f64 math run at the fp32 rate);
    bfloat16/float16 -> ``"bf16"``; float8_* -> ``"fp8"``;
    int8/uint8/bool and narrower ints -> ``"int8"``; MXFP8 -> ``"mx8"``;
    MXFP6 and bare float6 elements -> ``"mx6"``; MXFP4 and bare float4
    elements -> ``"mx4"``; MXINT8 -> ``"int8"``.
    """
    if dtype is None:
        raise ValueError("compute_class() needs a dtype, got None")
    if isinstance(dtype, enum.Enum):
        value = dtype.value if isinstance(dtype.value, str) else dtype.name
        return compute_class(value)
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key in MATMUL_CLASSES:
            return key
        if key in MX_FORMATS:
            return MX_FORMATS[key]
        if key in _STRING_ALIASES:
            return _STRING_ALIASES[key]
        try:
            np_dtype = np.dtype(key)
        except (TypeError, ValueError, SyntaxError):
            np_dtype = None
        if np_dtype is not None:
            cls = _class_from_dtype_name(np_dtype.name)
            if cls is not None:
                return cls
        raise ValueError(
            f"unknown dtype or compute class {dtype!r}; expected a NumPy/ml_dtypes "
            f"dtype, one of {', '.join(MATMUL_CLASSES)}, or an MX format "
            f"({', '.join(MX_FORMATS)})"
        )
    # MX types: an object whose ``format`` is a format name (or an object with a
    # ``name``), or a format object whose ``name`` is an MX format name.
    for candidate in (getattr(dtype, "format", None), dtype):
        mx_name = candidate if isinstance(candidate, (str, enum.Enum)) else getattr(candidate, "name", None)
        if isinstance(mx_name, enum.Enum):
            mx_name = mx_name.value if isinstance(mx_name.value, str) else mx_name.name
        if isinstance(mx_name, str) and mx_name.strip().lower() in MX_FORMATS:
            return MX_FORMATS[mx_name.strip().lower()]
    inner = getattr(dtype, "dtype", None)  # arrays, ShapeDtypeStruct, jnp scalar types
    if isinstance(inner, np.dtype):
        dtype = inner
    try:
        np_dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"cannot derive a compute class from {dtype!r}") from None
    cls = _class_from_dtype_name(np_dtype.name)
    if cls is None:
        raise ValueError(f"no compute class for dtype {np_dtype.name!r}")
    return cls


# --------------------------------------------------------------------------
# ChipSpec
# --------------------------------------------------------------------------

_USER_OVERRIDE = "user override"


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One accelerator as the cost model sees it. All rates are dense peaks.

    ``hbm_bytes``/``hbm_bandwidth`` describe the off-chip DRAM; on MTIA v1
    and MTIA 2i that is LPDDR5, not HBM (``memory_kind`` says which).
    The network (``runtime.collectives``): a scale-up domain of
    ``scaleup_domain`` devices over a ``scaleup_topology`` fabric
    (``TOPOLOGIES``); ``scaleup_link_bandwidth`` is unidirectional per device
    over all its ``scaleup_links`` links; a message takes
    ``scaleup_link_latency_s`` to cross the fabric (one switch hop) and a
    device's message engines take ``scaleup_message_s`` to issue one, one per
    link at a time. Between scale-up domains, ``scaleout_bandwidth``
    (unidirectional, per device) and ``scaleout_latency_s`` per message.
    ``hbm_random_access_efficiency`` (in (0, 1]) is the fraction of
    ``hbm_bandwidth`` achieved by reads of scattered 64-byte granules (rows
    gathered at random, as in embedding lookups) instead of streams.

    Achievable fractions of the peaks (in (0, 1]; ``FRACTION_FIELDS``), which
    the cost model applies on top of what it models explicitly (tile padding
    on the PE grid, random-access reads, the collective algorithm):
    ``matmul_efficiency`` of the matrix engine's peak (every compute class),
    ``hbm_efficiency`` of ``hbm_bandwidth`` and ``collective_efficiency`` of
    ``scaleup_link_bandwidth``. The roofline stays at the peaks. For the
    NVIDIA entries they are fitted on published measurements
    (``benchmarks/validate.py``, ``docs/validation.md``).
    ``sources`` maps a field name (``"hbm_bandwidth"``) or a rate key
    (``"peak_flops.bf16"``, ``"vector_flops.fp32"``) to the source text.
    """

    name: str
    generation: str
    vendor: str
    peak_flops: Mapping[str, float]
    vector_flops: Mapping[str, float]
    hbm_bytes: int
    hbm_bandwidth: float
    sram_bytes: int
    sram_bandwidth: float
    pe_rows: int
    pe_cols: int
    pe_local_bytes: int
    clock_hz: float
    tdp_watts: float
    host_link_bandwidth: float
    host_link_latency_s: float
    scaleup_domain: int
    scaleup_link_bandwidth: float
    scaleup_link_latency_s: float
    kernel_launch_s: float
    hbm_random_access_efficiency: float
    units: frozenset = frozenset()
    sources: Mapping[str, str] = dataclasses.field(default_factory=FrozenMapping)
    memory_kind: str = "HBM"
    matmul_efficiency: float = 1.0
    hbm_efficiency: float = 1.0
    collective_efficiency: float = 1.0
    # the network beyond bandwidth and hop latency; the catalogue sets each
    # with its source, the defaults serve specs built by hand
    scaleup_topology: str = "switched"
    scaleup_links: int = 1
    scaleup_message_s: float = 0.1e-6
    scaleout_bandwidth: float = 50e9
    scaleout_latency_s: float = 5e-6

    def __post_init__(self):
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("ChipSpec.name must be a non-empty string")
        set_(self, "peak_flops", self._checked_rates("peak_flops", MATMUL_CLASSES))
        set_(self, "vector_flops", self._checked_rates("vector_flops", VECTOR_CLASSES))
        for field in NUMERIC_FIELDS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"{self.name}: {field} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{self.name}: {field} must be positive and finite, got {value!r}")
            if field in _INT_FIELDS:
                if float(value) != int(value):
                    raise ValueError(f"{self.name}: {field} must be a whole number, got {value!r}")
                set_(self, field, int(value))
            else:
                set_(self, field, float(value))
        for field in FRACTION_FIELDS:
            if getattr(self, field) > 1:
                raise ValueError(f"{self.name}: {field} is a fraction in (0, 1], "
                                 f"got {getattr(self, field)!r}")
        if self.scaleup_topology not in TOPOLOGIES:
            raise ValueError(f"{self.name}: scaleup_topology must be one of {TOPOLOGIES}, got "
                             f"{self.scaleup_topology!r}")
        units = frozenset(self.units)
        unknown = units - set(UNITS)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown units {sorted(unknown)}; known: {', '.join(UNITS)}"
            )
        set_(self, "units", units)
        set_(self, "sources", FrozenMapping({str(k): str(v) for k, v in dict(self.sources).items()}))

    def _checked_rates(self, field: str, allowed: tuple[str, ...]) -> FrozenMapping:
        rates = dict(getattr(self, field))
        unknown = set(rates) - set(allowed)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown {field} classes {sorted(unknown)}; known: {', '.join(allowed)}"
            )
        if "fp32" not in rates:
            raise ValueError(f"{self.name}: {field} needs an 'fp32' rate (end of every fallback chain)")
        for cls, value in rates.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{self.name}: {field}[{cls}] must be positive, got {value!r}")
        # Keep the canonical class order so that printing is stable.
        return FrozenMapping({c: float(rates[c]) for c in allowed if c in rates})

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:  # specs are immutable: hash once (compile-cache keys use it)
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    # -- rates --------------------------------------------------------------

    def matmul_class(self, dtype: Any) -> str:
        """The class whose matrix-engine rate is used for ``dtype`` (after fallback)."""
        return self._resolve(dtype, self.peak_flops, MATMUL_FALLBACK)

    def vector_class(self, dtype: Any) -> str:
        """The class whose vector-unit rate is used for ``dtype`` (after fallback)."""
        return self._resolve(dtype, self.vector_flops, VECTOR_FALLBACK)

    def _resolve(self, dtype, rates, chains) -> str:
        cls = compute_class(dtype)
        for candidate in chains[cls]:
            if candidate in rates:
                return candidate
        raise ValueError(f"{self.name}: no rate for compute class {cls!r}")  # pragma: no cover

    def matmul_peak(self, dtype: Any) -> float:
        """Peak matrix-engine FLOP/s for ``dtype``, falling back to a wider datapath."""
        return self.peak_flops[self.matmul_class(dtype)]

    def vector_peak(self, dtype: Any) -> float:
        """Peak vector/SIMD FLOP/s for elementwise ops and reductions in ``dtype``."""
        return self.vector_flops[self.vector_class(dtype)]

    def is_native(self, dtype: Any) -> bool:
        """True if the matrix engine has a native datapath for ``dtype``'s class."""
        return compute_class(dtype) in self.peak_flops

    def ridge_point(self, dtype: Any = "bf16", memory: str = "hbm") -> float:
        """Peak FLOP per byte of ``memory`` ("hbm" or "sram") bandwidth."""
        bandwidth = {"hbm": self.hbm_bandwidth, "sram": self.sram_bandwidth}[memory]
        return self.matmul_peak(dtype) / bandwidth

    @property
    def num_pes(self) -> int:
        return self.pe_rows * self.pe_cols

    # -- overrides ----------------------------------------------------------

    def replace(self, **changes: Any) -> "ChipSpec":
        """A new spec with ``changes`` applied; the original is unchanged.

        Every changed numeric field (and every changed or added rate in
        ``peak_flops``/``vector_flops``) gets the source ``"user override"``;
        removed rates lose their source. An explicit ``sources=`` mapping is
        merged on top.
        """
        explicit_sources = dict(changes.pop("sources", {}) or {})
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"ChipSpec has no field(s) {sorted(unknown)}")
        sources = dict(self.sources)
        for field, value in changes.items():
            if field in ("peak_flops", "vector_flops"):
                old = getattr(self, field)
                new = dict(value)
                for cls in old:
                    if cls not in new:
                        sources.pop(f"{field}.{cls}", None)
                for cls, rate in new.items():
                    if old.get(cls) != rate:
                        sources[f"{field}.{cls}"] = _USER_OVERRIDE
            elif field in NUMERIC_FIELDS or field in ("units", "scaleup_topology"):
                if getattr(self, field) != value:
                    sources[field] = _USER_OVERRIDE
        sources.update(explicit_sources)
        return dataclasses.replace(self, sources=FrozenMapping(sources), **changes)

    # -- provenance ---------------------------------------------------------

    def source_keys(self) -> tuple[str, ...]:
        """Every key that should carry a source, in display order."""
        keys = [f"peak_flops.{c}" for c in self.peak_flops]
        keys += [f"vector_flops.{c}" for c in self.vector_flops]
        keys += list(NUMERIC_FIELDS)
        keys += ["scaleup_topology", "units"]
        return tuple(keys)

    def missing_sources(self) -> tuple[str, ...]:
        """Keys of numbers that have no (non-empty) source."""
        return tuple(k for k in self.source_keys() if not str(self.sources.get(k, "")).strip())

    def assumptions(self) -> dict[str, str]:
        """Key -> source for every value that is a modelling assumption (its label,
        the text before the first colon, says "assumption")."""
        return {
            k: self.sources[k]
            for k in self.source_keys()
            if "assumption" in str(self.sources.get(k, "")).split(":", 1)[0]
        }

    def describe_rows(self) -> list[tuple[str, str, str]]:
        """(field, value, source) for every field, for ``mtia-jax chips --sources``."""
        rows = [
            ("name", self.name, ""),
            ("generation", self.generation, ""),
            ("vendor", self.vendor, ""),
            ("memory_kind", self.memory_kind, self.sources.get("hbm_bytes", "")),
        ]
        for cls, rate in self.peak_flops.items():
            source = self.sources.get(f"peak_flops.{cls}", "")
            rows.append((f"peak_flops[{cls}]", _human(rate, "FLOP/s"), source))
        absent = [c for c in MATMUL_CLASSES if c not in self.peak_flops]
        for cls in absent:
            via = self.matmul_class(cls)
            rows.append((f"peak_flops[{cls}]", f"not native (runs at the {via} rate)", "fallback chain"))
        for cls, rate in self.vector_flops.items():
            rows.append(
                (f"vector_flops[{cls}]", _human(rate, "FLOP/s"), self.sources.get(f"vector_flops.{cls}", ""))
            )
        for field in NUMERIC_FIELDS:
            value = _human(getattr(self, field), _FIELD_UNITS[field])
            rows.append((field, value, self.sources.get(field, "")))
        rows.append(("scaleup_topology", self.scaleup_topology, self.sources.get("scaleup_topology", "")))
        unit_names = ", ".join(u for u in UNITS if u in self.units) or "none"
        rows.append(("units", unit_names, self.sources.get("units", "")))
        return rows

    def summary_row(self) -> dict[str, str]:
        """One row of the catalogue table, keyed by ``SUMMARY_COLUMNS``."""

        def tflops(cls: str) -> str:
            rate = self.peak_flops.get(cls)
            return "-" if rate is None else _fmt_number(rate / 1e12)

        hbm_gb = _fmt_number(self.hbm_bytes / 1e9)
        if self.memory_kind != "HBM":
            hbm_gb += "*"
        return {
            "name": self.name,
            "generation": self.generation,
            "BF16 TF": tflops("bf16"),
            "FP8 TF": tflops("fp8"),
            "MX4 TF": tflops("mx4"),
            "HBM GB": hbm_gb,
            "HBM TB/s": f"{self.hbm_bandwidth / 1e12:.3g}",
            "SRAM MB": _fmt_number(self.sram_bytes / 2**20),
            "scale-up": str(self.scaleup_domain),
            "TDP W": _fmt_number(self.tdp_watts),
            "units": ",".join(u for u in UNITS if u in self.units) or "-",
        }


SUMMARY_COLUMNS = (
    "name",
    "generation",
    "BF16 TF",
    "FP8 TF",
    "MX4 TF",
    "HBM GB",
    "HBM TB/s",
    "SRAM MB",
    "scale-up",
    "TDP W",
    "units",
)
_LEFT_ALIGNED = frozenset({"name", "generation", "units"})


def _fmt_number(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _human(value: float, unit: str) -> str:
    """A number with its unit, scaled for reading (raw value kept in brackets)."""
    if unit == "FLOP/s":
        return f"{value / 1e12:,.6g} TFLOP/s"
    if unit == "B/s":
        if value >= 1e12:
            return f"{value / 1e12:.6g} TB/s"
        return f"{value / 1e9:.6g} GB/s"
    if unit == "B":
        if value >= 1e9 and value % 10**9 == 0:
            return f"{value // 10**9} GB ({value:,} B)"
        if value % 2**20 == 0:
            return f"{value // 2**20} MiB ({value:,} B)"
        if value % 2**10 == 0:
            return f"{value // 2**10} KiB ({value:,} B)"
        return f"{value:,} B"
    if unit == "s":
        return f"{value * 1e6:.6g} us"
    if unit == "Hz":
        return f"{value / 1e9:.6g} GHz"
    if unit == "devices" and value == 1:
        return "1 device"
    if unit:
        return f"{_fmt_number(value)} {unit}"
    return _fmt_number(value)


def summary_table(chips: Iterable[ChipSpec | str] | None = None) -> str:
    """The catalogue as an aligned text table (one row per chip)."""
    chosen = [get(c) for c in (names() if chips is None else chips)]
    rows = [s.summary_row() for s in chosen]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in SUMMARY_COLUMNS}

    def line(cells: Mapping[str, str]) -> str:
        parts = [
            cells[c].ljust(widths[c]) if c in _LEFT_ALIGNED else cells[c].rjust(widths[c])
            for c in SUMMARY_COLUMNS
        ]
        return "  ".join(parts).rstrip()

    out = [line({c: c for c in SUMMARY_COLUMNS})]
    out.append("  ".join("-" * widths[c] for c in SUMMARY_COLUMNS))
    out.extend(line(r) for r in rows)
    notes = [
        "TF = dense peak TFLOP/s of the matrix engine; '-' = no native datapath "
        "(emulated on a wider one, see ChipSpec.matmul_peak).",
        "SRAM MB = on-chip SRAM in MiB; scale-up = devices per scale-up domain.",
    ]
    if any(s.memory_kind != "HBM" for s in chosen):
        notes.append("* off-chip memory is LPDDR5 DRAM, not HBM.")
    out.append("")
    out.extend(notes)
    return "\n".join(out)


# --------------------------------------------------------------------------
# Catalogue constants and helpers
# --------------------------------------------------------------------------

KiB = 2**10
MiB = 2**20
GB = 10**9
TB = 10**12
TFLOPS = 1e12
PFLOPS = 1e15
US = 1e-6

# PCIe per-lane, per-direction payload rate: GT/s x 128b/130b encoding / 8 bits
# (PCIe base specification line rates: Gen4 16 GT/s, Gen5 32 GT/s).
_PCIE4_LANE = 16e9 * 128 / 130 / 8
_PCIE5_LANE = 32e9 * 128 / 130 / 8

# MTIA 2i published figures that the 300-500 assumptions scale from.
_V2I_BF16 = 177 * TFLOPS  # P [TPU24, TR24]
_V2I_VEC_BF16 = 5.53 * TFLOPS  # S [TPU24]
_V2I_VEC_FP32 = 2.76 * TFLOPS  # S [TPU24]
_V2I_VEC_INT8 = 11.06 * TFLOPS  # S [TPU24]
_V2I_SRAM_BW = 0.8 * TB * 3.5  # derived: v1 800 GB/s (S [SVH23]) x 3.5 (P [EEN24])

# Source texts used by several entries.
_SRC_M26 = "P [M26 via TH26, WCCF26, DEC26, HWL26]"
_SRC_FIL26 = "P [M26 via FIL26] (network rows of the M26 table)"
_A_FP32_MTIA = (
    "assumption: fp32 matmul not published; taken as BF16 / 4 "
    "(fp32 emulated with several bf16 passes on the DPE)"
)
_A_MX6 = (
    "assumption: MX6 not published; MX6 elements run on the MX8 datapath (= MX8 rate)"
)
_A_VEC_SCALE = (
    "derived (assumption): BF16 matmul peak x MTIA 2i's SIMD/DPE ratio "
    "({num} / 177 TFLOPS, S [TPU24] / P [TPU24, TR24]); vector rates not published"
)
_A_SRAM_BW_SCALE = (
    "derived (assumption): BF16 peak x MTIA 2i's SRAM bytes per FLOP "
    "(2.8 TB/s / 177 TFLOPS, hardware-facts D value), i.e. the 2i SRAM ridge point "
    "of ~63 FLOP/B is kept; not published"
)
_A_CLOCK_300 = (
    "assumption: not published; MTIA 2i's 1.35 GHz (P [TPU24, TR24]) carried over"
)
_A_PE_LOCAL_300 = (
    "assumption: not published; MTIA 2i's 384 KB per PE (P [EEN24, STH24]) carried over, "
    "kB read as KiB"
)
_A_HOST_PCIE5_X16 = (
    "assumption: host link not published; PCIe Gen5 (2i's generation, P [STH24]) at x16 "
    "= 16 lanes x 32 GT/s x 128/130 / 8 = 63.0 GB/s per direction"
)
_A_HOST_LATENCY = "assumption: 1 us per host-link transfer (order of one PCIe DMA round trip)"
_A_LAUNCH_REUSE = (
    "assumption: not published; MTIA 2i's eager job launch bound of < 1 us (P [TR24]) reused"
)
_A_SCALEUP_LATENCY_MTIA = (
    "assumption: 1 us for a message to cross the rack's switched backplane (P [DEC26]): one "
    "switch hop (a few hundred ns in cut-through Ethernet switches) plus the NIC chiplets and "
    "message engines at both ends (P [HWL26, WCCF26]); not published"
)
_A_MESSAGE_S = (
    "assumption: 0.1 us for a message engine to issue one message (descriptor processing "
    "and doorbell of an RDMA-style send; RDMA NICs issue 10^7-10^8 messages/s); the message "
    "engines that offload collectives are P [HWL26, WCCF26], their issue rate is not published"
)
_A_SCALEOUT_LATENCY = (
    "assumption: 5 us per message between racks (RDMA over a two- or three-tier Ethernet "
    "network: NIC, switch hops and cables); not published"
)
# MTIA v1 and 2i have no scale-up fabric: chips talk through the host
_THROUGH_HOST = {
    "scaleup_topology": ("switched", "derived: chips reach each other through the host's PCIe root complex, which switches every pair"),
    "scaleup_links": (1, "derived: the one host link"),
    "scaleup_message_s": (1 * US, "derived: one host-link transfer at the assumed 1 us (" + _A_HOST_LATENCY + ")"),
    "scaleout_bandwidth": (100 * GB / 8, "assumption: one 100 Gb/s RDMA NIC per host board (STH24 names an optional RDMA NIC, P); speed not published"),
    "scaleout_latency_s": (5 * US, _A_SCALEOUT_LATENCY),
}
_TOPOLOGY_MTIA = (
    "P [DEC26, agent-wars 2026]: the 72 devices of a rack form one scale-up domain over a "
    "switched backplane"
)
_A_RANDOM_HBM = (
    "assumption: not published; scattered 64-byte reads need a DRAM row activation each, "
    "and activation-rate limits (tRRD/tFAW) let an HBM pseudo-channel open a new row about "
    "every other 64-byte transfer time: 0.5 of the streaming bandwidth"
)
_A_RANDOM_LPDDR = (
    "assumption: not published; as for HBM (a row activation per scattered 64-byte read), "
    "lowered to 0.4 because an LPDDR5 channel has fewer banks to overlap activations than an "
    "HBM pseudo-channel"
)
_NMR_300 = (
    "near_memory_reduce: P [HWL26, WCCF26] (near-memory compute, message engines that "
    "offload collectives)"
)
_NMR_400_500 = (
    "near_memory_reduce: derived from MTIA 300's near-memory compute / message engines "
    "(P [HWL26, WCCF26]), assumed kept on 400-500, which share the network infrastructure "
    "(P [TH26])"
)


# Achievable fractions of peak and launch overhead of the NVIDIA Hopper entries
# (H100 and H200 share the SM and the fit), fitted by benchmarks/validate.py on
# the training rows of benchmarks/validation_data.py (method and result:
# docs/validation.md). kernel_launch_s is per modeled kernel: it also absorbs
# the host-side overhead of the measured engines and the gap between the
# modeled kernel count and theirs.
HOPPER_FIT = {
    "matmul_efficiency": 0.605,
    "hbm_efficiency": 1.0,       # held at 1: the rows do not identify it (validate.FIXED)
    "collective_efficiency": 1.0,  # held at 1: the rows do not identify it (validate.FIXED)
    "kernel_launch_s": 1.41e-05,
}
HOPPER_FIT_ROWS = ("r01", "r03", "r05", "r07", "r09", "r11", "r13", "r15", "r19", "r21", "r23")
_SRC_HOPPER_FIT = (
    "derived: fitted on the training rows "
    + ", ".join(HOPPER_FIT_ROWS)
    + " of benchmarks/validation_data.py (published H100/H200 measurements; "
    "benchmarks/validate.py, docs/validation.md)"
)
# fields HOPPER_FIT holds at 1 rather than fits (benchmarks/validate.py FIXED)
_HOPPER_HELD = frozenset({"hbm_efficiency", "collective_efficiency"})
_SRC_HOPPER_HELD = (
    "assumption: held at 1 by the fit on the training rows of benchmarks/validation_data.py, "
    "which do not identify it (benchmarks/validate.py, docs/validation.md)"
)
# MTIA entries: what carries over from the Hopper fit (docs/validation.md).
_MTIA_EFFICIENCIES = {
    "matmul_efficiency": (
        1.0,
        "assumption: the published peak; the H100/H200 fit (HOPPER_FIT) is not transferred: it "
        "also absorbs GPU clock throttling and the measured engines' kernels, MTIA's PE-grid "
        "utilisation is modeled by the tiling pass, and no MTIA measurement exists (MTIA "
        "compute-bound figures are uncalibrated)",
    ),
    "hbm_efficiency": (
        HOPPER_FIT["hbm_efficiency"],
        "derived: transferred from the H100/H200 fit on the training rows "
        + ", ".join(HOPPER_FIT_ROWS)
        + " of benchmarks/validation_data.py: an achievable fraction of DRAM bandwidth is a "
        "memory property (HBM3/HBM3e refresh, bank and turnaround losses); assumption for the "
        "LPDDR5 chips",
    ),
    "collective_efficiency": (
        1.0,
        "assumption: the ideal link bandwidth; MTIA's scale-up fabric is unmeasured and the "
        "NVLink fit (HOPPER_FIT) describes NCCL running on GPU SMs",
    ),
}


def _spec(
    name: str, generation: str, vendor: str, *, peak, vector, units, memory_kind="HBM", **numbers
) -> ChipSpec:
    """Build a ChipSpec from ``{key: (value, source)}`` pairs, so that every number
    in the catalogue below sits next to its source."""
    sources: dict[str, str] = {}
    peak_values, vector_values, values = {}, {}, {}
    for cls, (value, src) in peak.items():
        peak_values[cls] = value
        sources[f"peak_flops.{cls}"] = src
    for cls, (value, src) in vector.items():
        vector_values[cls] = value
        sources[f"vector_flops.{cls}"] = src
    for field, (value, src) in numbers.items():
        values[field] = value
        sources[field] = src
    unit_set, unit_src = units
    sources["units"] = unit_src
    return ChipSpec(
        name=name,
        generation=generation,
        vendor=vendor,
        peak_flops=peak_values,
        vector_flops=vector_values,
        units=frozenset(unit_set),
        sources=sources,
        memory_kind=memory_kind,
        **values,
    )


def _mtia_vector(bf16_peak: float, basis: str) -> dict:
    """Vector rates of a chip without published SIMD figures, scaled from 2i."""
    return {
        "fp32": (bf16_peak * _V2I_VEC_FP32 / _V2I_BF16, _A_VEC_SCALE.format(num="2.76") + f"; {basis}"),
        "bf16": (bf16_peak * _V2I_VEC_BF16 / _V2I_BF16, _A_VEC_SCALE.format(num="5.53") + f"; {basis}"),
        "int8": (bf16_peak * _V2I_VEC_INT8 / _V2I_BF16, _A_VEC_SCALE.format(num="11.06") + f"; {basis}"),
    }


def _mtia_2026(
    name: str,
    *,
    bf16: float,
    fp8: float,
    mx4: float | None,
    hbm_gb: float,
    hbm_src: str,
    hbm_tbs: float,
    hbm_bw_src: str,
    tdp: float,
    sram_mib: int,
    sram_src: str,
    pe_rows: int,
    pe_cols: int,
    pe_src: str,
    scaleup_domain: int,
    scaleup_tbs: float,
    units: tuple[set, str],
    scaleup_links: tuple[int, str] = (
        12,
        "assumption (U lead in hardware-facts 1.3, unverified: MTIA 300's two NIC chiplets have "
        "2 x 6 ports of 800 Gbps): 12 ports of 100 GB/s = the 1.2 TB/s per device of P [M26 via "
        "FIL26], kept on 400-500, which share the network infrastructure (P [TH26])",
    ),
    scaleout: tuple[float, str] = (100 * GB, "P [M26 via FIL26], unidirectional per device"),
) -> ChipSpec:
    """An MTIA 300/400/450/500 entry (hardware-facts section 1.2)."""
    peak = {
        "fp32": (bf16 / 4, _A_FP32_MTIA),
        "bf16": (bf16, _SRC_M26),
        "fp8": (fp8, _SRC_M26 + " (table row 'FP8/MX8')"),
        "mx8": (fp8, _SRC_M26 + " (table row 'FP8/MX8': MX8 = FP8 rate)"),
        "mx6": (fp8, _A_MX6),
    }
    if mx4 is not None:
        peak["mx4"] = (mx4, _SRC_M26)
    return _spec(
        name,
        f"MTIA {name[4:]} (2026)",
        "Meta",
        peak=peak,
        vector=_mtia_vector(bf16, f"BF16 {bf16 / PFLOPS:g} PFLOPS {_SRC_M26}"),
        units=units,
        hbm_bytes=(int(hbm_gb * GB), hbm_src),
        hbm_bandwidth=(hbm_tbs * TB, hbm_bw_src),
        sram_bytes=(sram_mib * MiB, sram_src),
        sram_bandwidth=(bf16 * _V2I_SRAM_BW / _V2I_BF16, _A_SRAM_BW_SCALE),
        pe_rows=(pe_rows, pe_src),
        pe_cols=(pe_cols, pe_src),
        pe_local_bytes=(384 * KiB, _A_PE_LOCAL_300),
        clock_hz=(1.35e9, _A_CLOCK_300),
        tdp_watts=(tdp, _SRC_M26 + " (module TDP)"),
        host_link_bandwidth=(16 * _PCIE5_LANE, _A_HOST_PCIE5_X16),
        host_link_latency_s=(1 * US, _A_HOST_LATENCY),
        scaleup_domain=(scaleup_domain, _SRC_FIL26),
        scaleup_link_bandwidth=(scaleup_tbs * TB, _SRC_FIL26 + ", unidirectional per device"),
        scaleup_link_latency_s=(1 * US, _A_SCALEUP_LATENCY_MTIA),
        scaleup_topology=("switched", _TOPOLOGY_MTIA),
        scaleup_links=scaleup_links,
        scaleup_message_s=(0.1 * US, _A_MESSAGE_S),
        scaleout_bandwidth=scaleout,
        scaleout_latency_s=(5 * US, _A_SCALEOUT_LATENCY),
        kernel_launch_s=(1 * US, _A_LAUNCH_REUSE),
        hbm_random_access_efficiency=(0.5, _A_RANDOM_HBM),
        **_MTIA_EFFICIENCIES,
    )


def _nvidia_hopper(
    name: str,
    generation: str,
    *,
    hbm_gb: int,
    hbm_tbs: float,
    hbm_src: str,
    tdp_src: str,
    scaleup_src: str,
) -> ChipSpec:
    """H100 / H200 SXM (hardware-facts section 2); same compute die."""
    bf16 = 989.4 * TFLOPS
    vec_fp32 = 66.9 * TFLOPS
    return _spec(
        name,
        generation,
        "NVIDIA",
        peak={
            "fp32": (bf16 / 2, "derived: TF32 tensor-core rate = BF16 / 2 (989.4 / 2 TFLOPS, P [NVDS])"),
            "bf16": (bf16, "P [NVDS] (dense; 1,979 sparse)"),
            "fp8": (1978.9 * TFLOPS, "P [NVDS] (dense; 3,958 sparse)"),
        },
        vector={
            "fp32": (
                vec_fp32,
                "assumption: NVIDIA datasheet FP32 (non-tensor) rate, not reproduced in "
                "hardware-facts; = 132 SMs x 128 lanes x 2 FLOP x 1.98 GHz",
            ),
            "bf16": (2 * vec_fp32, "assumption: packed bf16x2 FMA = 2 x the FP32 vector rate"),
            "int8": (
                4 * vec_fp32,
                "assumption: same fp32:bf16:int8 = 1:2:4 vector ratio as MTIA 2i's SIMD (S [TPU24])",
            ),
        },
        units=(set(), "none of the modelled dedicated units (FlashAttention/MoE run as tensor-core kernels)"),
        hbm_bytes=(hbm_gb * GB, hbm_src),
        hbm_bandwidth=(hbm_tbs * TB, "P [NVDS]"),
        sram_bytes=(50 * MiB, "assumption: the 50 MB L2 cache (NVIDIA whitepaper, not in hardware-facts), read as MiB"),
        sram_bandwidth=(
            5.5 * TB,
            "assumption: L2 bandwidth of the order reported by public microbenchmarks; "
            "not in hardware-facts",
        ),
        pe_rows=(12, "assumption: the 132 SMs (NVIDIA whitepaper, not in hardware-facts) modelled as a 12 x 11 grid"),
        pe_cols=(11, "assumption: the 132 SMs (NVIDIA whitepaper, not in hardware-facts) modelled as a 12 x 11 grid"),
        pe_local_bytes=(228 * KiB, "assumption: 228 KB shared memory per SM (NVIDIA whitepaper, not in hardware-facts)"),
        clock_hz=(1.98e9, "assumption: 1.98 GHz boost clock (NVIDIA datasheet, not in hardware-facts)"),
        tdp_watts=(700, tdp_src),
        host_link_bandwidth=(
            16 * _PCIE5_LANE,
            "assumption: PCIe Gen5 x16 host interface (NVIDIA datasheet, not in hardware-facts) "
            "= 16 x 32 GT/s x 128/130 / 8 = 63.0 GB/s per direction",
        ),
        host_link_latency_s=(1 * US, _A_HOST_LATENCY),
        scaleup_domain=(8, scaleup_src),
        scaleup_link_bandwidth=(
            900 * GB / 2,
            "derived: NVLink4 900 GB/s bidirectional (P [NVDS, MLP41]) / 2 = 450 GB/s unidirectional",
        ),
        scaleup_link_latency_s=(1 * US, "assumption: 1 us per NVLink message (through NVSwitch); not in hardware-facts"),
        scaleup_topology=("switched", "derived: the 8 GPUs of an HGX board reach each other through NVSwitch (MLP41 system 'DGX-H100_H100-SXM-80GBx8', NVLink4)"),
        scaleup_links=(18, "P [NVDS]: NVLink4, 18 links per GPU"),
        scaleup_message_s=(0.5 * US, "assumption: 0.5 us to issue one NVLink message (a copy-engine or SM-driven send, NCCL's simple protocol); not in hardware-facts"),
        scaleout_bandwidth=(50 * GB, "assumption: one 400 Gb/s ConnectX-7 NIC per GPU in a DGX H100 (NVIDIA datasheet, not in hardware-facts) = 50 GB/s"),
        scaleout_latency_s=(5 * US, _A_SCALEOUT_LATENCY),
        hbm_random_access_efficiency=(0.5, _A_RANDOM_HBM),
        **{field: (value, _SRC_HOPPER_FIT if field not in _HOPPER_HELD else _SRC_HOPPER_HELD)
           for field, value in HOPPER_FIT.items()},
    )


def _catalogue() -> list[ChipSpec]:
    mtia300 = _mtia_2026(
        "mtia300",
        bf16=0.6 * PFLOPS,
        fp8=1.2 * PFLOPS,
        mx4=None,  # not listed in the M26 table: mx4 falls back to the MX8 rate
        hbm_gb=216,
        hbm_src=_SRC_M26,
        hbm_tbs=6.1,
        hbm_bw_src=_SRC_M26 + " (WCCF26 text: 6.12)",
        tdp=800,
        sram_mib=256,
        sram_src="assumption: not published; MTIA 2i's 256 MB (P [EEN24]) carried over to the one compute chiplet (P [HWL26, WCCF26]), MB read as MiB",
        pe_rows=8,
        pe_cols=8,
        pe_src="assumption: not published; MTIA 2i's 8 x 8 PE grid (P [EEN24, STH24]) for the one compute chiplet (P [HWL26, WCCF26])",
        scaleup_domain=16,
        scaleup_tbs=1.0,
        scaleup_links=(
            12,
            "assumption (U lead in hardware-facts 1.3, unverified): 2 NIC chiplets x 6 x 800 Gbps; "
            "their 1.2 TB/s conflicts with M26's 1 TB/s (P), which is kept for the bandwidth",
        ),
        scaleout=(200 * GB, "P [M26 via FIL26] (footnote '**' of the table: not explained)"),
        units=({"near_memory_reduce", "mx_matmul"}, _NMR_300 + "; mx_matmul: MX8 listed (P [M26 via TH26], 'FP8/MX8' row); no MX4 rate listed"),
    )
    mtia400 = _mtia_2026(
        "mtia400",
        bf16=3 * PFLOPS,
        fp8=6 * PFLOPS,
        mx4=12 * PFLOPS,
        hbm_gb=288,
        hbm_src=_SRC_M26,
        hbm_tbs=9.2,
        hbm_bw_src=_SRC_M26,
        tdp=1200,
        sram_mib=512,
        sram_src="assumption: not published; 2 compute chiplets (S [VIK26]) x MTIA 2i's 256 MB (P [EEN24]), MB read as MiB",
        pe_rows=8,
        pe_cols=16,
        pe_src="assumption: not published; 2 compute chiplets (S [VIK26]) side by side, each with MTIA 2i's 8 x 8 grid (P [EEN24, STH24])",
        scaleup_domain=72,
        scaleup_tbs=1.2,
        units=({"near_memory_reduce", "mx_matmul"}, _NMR_400_500 + "; mx_matmul: MX4 and MX8 rates listed (P [M26 via TH26])"),
    )
    mtia450 = _mtia_2026(
        "mtia450",
        bf16=3.5 * PFLOPS,
        fp8=7 * PFLOPS,
        mx4=21 * PFLOPS,
        hbm_gb=288,
        hbm_src=_SRC_M26,
        hbm_tbs=18.4,
        hbm_bw_src=_SRC_M26 + " ('2x HBM BW of 400', P [TH26])",
        tdp=1400,
        sram_mib=512,
        sram_src="assumption: not published; same compute-chiplet arrangement as MTIA 400 (400/450/500 share chassis and rack, P [TH26]; 450 differs by HBM), 2 x 256 MiB",
        pe_rows=8,
        pe_cols=16,
        pe_src="assumption: not published; same compute-chiplet arrangement as MTIA 400: 2 x MTIA 2i's 8 x 8 grid (P [EEN24, STH24])",
        scaleup_domain=72,
        scaleup_tbs=1.2,
        units=(
            {"flash_attention", "moe_ffn", "near_memory_reduce", "mx_matmul"},
            "flash_attention, moe_ffn: P [TH26] (hardware acceleration for FlashAttention and MoE FFN); "
            + _NMR_400_500
            + "; mx_matmul: MX4 and MX8 rates listed (P [M26 via TH26])",
        ),
    )
    mtia500 = _mtia_2026(
        "mtia500",
        bf16=5 * PFLOPS,
        fp8=10 * PFLOPS,
        mx4=30 * PFLOPS,
        hbm_gb=512,
        hbm_src=_SRC_M26 + " lists 384-512 GB; 512 GB chosen to match 'up to +80% HBM capacity vs 450' (P [BRF26, TH26]): 512/288 = 1.78",
        hbm_tbs=27.6,
        hbm_bw_src=_SRC_M26 + " ('+50% HBM BW vs 450', P [BRF26, TH26])",
        tdp=1700,
        sram_mib=512,
        sram_src="assumption: not published; 2 x 2 'smaller' compute chiplets (P [GLOB26]) at 128 MiB each (half of MTIA 2i's 256 MB, P [EEN24])",
        pe_rows=16,
        pe_cols=16,
        pe_src="assumption: not published; 2 x 2 compute chiplets (P [GLOB26]), each assumed to keep MTIA 2i's 8 x 8 grid (P [EEN24, STH24])",
        scaleup_domain=72,
        scaleup_tbs=1.2,
        units=(
            {"flash_attention", "moe_ffn", "near_memory_reduce", "mx_matmul"},
            "flash_attention, moe_ffn: derived: MTIA 450's FlashAttention / MoE FFN acceleration "
            "(P [TH26]) assumed kept on the later 500; "
            + _NMR_400_500
            + "; mx_matmul: MX4 and MX8 rates listed (P [M26 via TH26])",
        ),
    )

    v1_bf16 = 51.2 * TFLOPS
    mtia_v1 = _spec(
        "mtia_v1",
        "MTIA v1 / MTIA 100 (2023)",
        "Meta",
        peak={
            "fp32": (v1_bf16 / 4, _A_FP32_MTIA),
            "bf16": (v1_bf16, "P [M23] (published as FP16; the bf16 class covers FP16)"),
            "int8": (102.4 * TFLOPS, "P [M23]"),
        },
        vector=_mtia_vector(v1_bf16, "FP16 51.2 TFLOPS P [M23]"),
        units=(set(), "none of the modelled dedicated units published (P [M23], S [SVH23])"),
        memory_kind="LPDDR5",
        hbm_bytes=(
            64 * GB,
            "S [UT23]: LPDDR5 DRAM (not HBM), 16 channels; SVH23 says 'up to 128 GB' - 64 GB "
            "chosen, consistent with M24's 'doubled' LPDDR5 capacity for 2i's 128 GB",
        ),
        hbm_bandwidth=(176 * GB, "S [SVH23]: LPDDR5 DRAM bandwidth (not HBM)"),
        sram_bytes=(128 * MiB, "S [SVH23], MB read as MiB"),
        sram_bandwidth=(800 * GB, "S [SVH23]"),
        pe_rows=(8, "S [SVH23, UT23] (8 x 8 grid)"),
        pe_cols=(8, "S [SVH23, UT23] (8 x 8 grid)"),
        pe_local_bytes=(128 * KiB, "derived: 384 KB / 3 (2i has 'three times the local PE storage at 384 kB', P [EEN24])"),
        clock_hz=(800e6, "P [M23]"),
        tdp_watts=(25, "P [M23]"),
        host_link_bandwidth=(
            8 * _PCIE4_LANE,
            "assumption (U lead in hardware-facts §1.1, unverified): PCIe Gen4 x8 "
            "= 8 x 16 GT/s x 128/130 / 8 = 15.75 GB/s per direction",
        ),
        host_link_latency_s=(1 * US, _A_HOST_LATENCY),
        scaleup_domain=(1, "derived: no scale-up fabric published; chips talk through the host"),
        scaleup_link_bandwidth=(
            8 * _PCIE4_LANE,
            "assumption: chip-to-chip traffic crosses the host link (= host_link_bandwidth)",
        ),
        scaleup_link_latency_s=(2 * US, "derived: two host-link transfers (device -> host -> device) at the assumed 1 us"),
        **_THROUGH_HOST,
        kernel_launch_s=(1 * US, _A_LAUNCH_REUSE),
        hbm_random_access_efficiency=(0.4, _A_RANDOM_LPDDR),
        **_MTIA_EFFICIENCIES,
    )

    mtia_v2i = _spec(
        "mtia_v2i",
        "MTIA 2i / MTIA 200 (2024)",
        "Meta",
        peak={
            "fp32": (_V2I_BF16 / 4, _A_FP32_MTIA),
            "bf16": (_V2I_BF16, "P [TPU24, TR24] (FP16/BF16; 354 sparse)"),
            "int8": (354 * TFLOPS, "P [TPU24, TR24] (708 sparse)"),
        },
        vector={
            "fp32": (_V2I_VEC_FP32, "S [TPU24]"),
            "bf16": (_V2I_VEC_BF16, "S [TPU24] (FP16/BF16)"),
            "int8": (_V2I_VEC_INT8, "S [TPU24]"),
        },
        units=(
            set(),
            "none of the modelled units (its quantization and decompression engines, P [STH24, EEN24, TR24], are not modelled)",
        ),
        memory_kind="LPDDR5",
        hbm_bytes=(128 * GB, "P [STH24, TR24]: LPDDR5 DRAM (not HBM), 16 channels"),
        hbm_bandwidth=(204.8 * GB, "P [STH24, TR24]: LPDDR5 DRAM bandwidth (not HBM)"),
        sram_bytes=(256 * MiB, "P [EEN24], MB read as MiB"),
        sram_bandwidth=(_V2I_SRAM_BW, "derived: 3.5 x v1's 800 GB/s (ratio P [EEN24], v1 value S [SVH23]) = 2.8 TB/s"),
        pe_rows=(8, "P [EEN24, STH24] (8 x 8 grid)"),
        pe_cols=(8, "P [EEN24, STH24] (8 x 8 grid)"),
        pe_local_bytes=(384 * KiB, "P [EEN24, STH24] (384 kB, read as KiB)"),
        clock_hz=(1.35e9, "P [TPU24, TR24]"),
        tdp_watts=(90, "P [TPU24, STH24]"),
        host_link_bandwidth=(
            8 * _PCIE5_LANE,
            "derived: PCIe Gen5 x8 (P [STH24]) = 8 x 32 GT/s x 128/130 / 8 = 31.5 GB/s per direction",
        ),
        host_link_latency_s=(1 * US, _A_HOST_LATENCY),
        scaleup_domain=(
            1,
            "derived: no scale-up fabric published; chips reach each other via host PCIe or an optional RDMA NIC (P [STH24])",
        ),
        scaleup_link_bandwidth=(
            8 * _PCIE5_LANE,
            "assumption: chip-to-chip traffic crosses the host PCIe Gen5 x8 link (= host_link_bandwidth)",
        ),
        scaleup_link_latency_s=(2 * US, "derived: two host-link transfers (device -> host -> device) at the assumed 1 us"),
        **_THROUGH_HOST,
        kernel_launch_s=(1 * US, "P [TR24] (eager-mode job launch < 1 us; the bound is used)"),
        hbm_random_access_efficiency=(0.4, _A_RANDOM_LPDDR),
        **_MTIA_EFFICIENCIES,
    )

    h100 = _nvidia_hopper(
        "h100",
        "Hopper H100 SXM",
        hbm_gb=80,
        hbm_tbs=3.35,
        hbm_src="P [NVDS, MLP41] (HBM3)",
        tdp_src="P [NVDS] (up to 700 W)",
        scaleup_src="derived: 8 GPUs per NVLink domain of a DGX/HGX H100 board (MLP41 system 'DGX-H100_H100-SXM-80GBx8')",
    )
    h200 = _nvidia_hopper(
        "h200",
        "Hopper H200 SXM",
        hbm_gb=141,
        hbm_tbs=4.8,
        hbm_src="P [NVDS] (HBM3e)",
        tdp_src="P [NVDS, MLP41] (700 W TGP)",
        scaleup_src="assumption: 8-GPU HGX H200 board, same NVLink domain as the DGX/HGX H100 (MLP41)",
    )
    return [mtia300, mtia400, mtia450, mtia500, mtia_v1, mtia_v2i, h100, h200]


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

_REGISTRY: dict[str, ChipSpec] = {}

# Other spellings of catalogue names ("MTIA 100/200" are Meta's later names
# for v1 / 2i, P [M26]).
_ALIASES = {
    "mtia100": "mtia_v1",
    "mtia200": "mtia_v2i",
    "mtia2i": "mtia_v2i",
    "mtiav2": "mtia_v2i",
    "h100sxm": "h100",
    "h200sxm": "h200",
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in " -_.")


def names() -> tuple[str, ...]:
    """Registered chip names, in catalogue order."""
    return tuple(spec.name for spec in _REGISTRY.values())


def specs() -> tuple[ChipSpec, ...]:
    """Registered chips, in catalogue order."""
    return tuple(_REGISTRY.values())


def get(chip: ChipSpec | str) -> ChipSpec:
    """The spec for ``chip``: a ChipSpec is returned unchanged; a name is looked
    up case-insensitively (spaces, '-', '_' ignored; "MTIA 450" == "mtia450").
    """
    if isinstance(chip, ChipSpec):
        return chip
    if not isinstance(chip, str):
        raise TypeError(f"expected a chip name or ChipSpec, got {type(chip).__name__}")
    key = _key(chip)
    key = _key(_ALIASES.get(key, key))
    spec = _REGISTRY.get(key)
    if spec is None:
        raise ValueError(f"unknown chip {chip!r}; known chips: {', '.join(names())}")
    return spec


def register(spec: ChipSpec, *, overwrite: bool = False) -> ChipSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises ``ValueError`` if the name is taken (or is an alias of a catalogue
    chip) unless ``overwrite=True``. Use ``spec.missing_sources()`` to check
    that every number of a new spec says where it comes from.
    """
    if not isinstance(spec, ChipSpec):
        raise TypeError(f"register() expects a ChipSpec, got {type(spec).__name__}")
    _DEFAULT_BY_ENV.clear()
    key = _key(spec.name)
    if not overwrite and (key in _REGISTRY or key in _ALIASES):
        raise ValueError(f"chip {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = spec
    return spec


def default_name() -> str:
    """``$MTIA_JAX_CHIP`` if set (validated), else ``DEFAULT_CHIP``."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return DEFAULT_CHIP
    try:
        return get(value).name
    except ValueError as err:
        raise ValueError(f"{ENV_VAR}={value!r}: {err}") from None


_DEFAULT_BY_ENV: dict[str, ChipSpec] = {}  # $MTIA_JAX_CHIP value -> spec; cleared by register()


def default() -> ChipSpec:
    """The default chip (see :func:`default_name`). Cheap enough for every call."""
    value = os.environ.get(ENV_VAR, "")
    spec = _DEFAULT_BY_ENV.get(value)
    if spec is None:
        spec = _DEFAULT_BY_ENV[value] = get(default_name())
    return spec


for _chip in _catalogue():
    register(_chip)
del _chip
