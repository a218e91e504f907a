"""OCP Microscaling (MX) formats v1.0: format catalogue, quantize, dequantize.

An MX tensor stores each block of ``block_size`` consecutive values along one
axis as ``block_size`` narrow *elements* that share one power-of-two *scale*
(an E8M0 byte, ``ml_dtypes.float8_e8m0fnu``).  The value of element ``i`` of a
block is ``X * P_i``.

Formats (OCP MX v1.0, Table 1):

=============  =================  ==========  =====  ===========
name           element            bits        emax   max normal
=============  =================  ==========  =====  ===========
mxfp8_e4m3     float8_e4m3fn      8           8      448
mxfp8_e5m2     float8_e5m2        8           15     57344
mxfp6_e3m2     float6_e3m2fn      6           4      28
mxfp6_e2m3     float6_e2m3fn      6           2      7.5
mxfp4_e2m1     float4_e2m1fn      4           2      6
mxint8         int8 (fixed 1.6)   8           0      127/64
=============  =================  ==========  =====  ===========

Aliases: ``mx8`` = mxfp8_e4m3, ``mx6`` = mxfp6_e2m3, ``mx4`` = mxfp4_e2m1.

Conversion (spec section 6.3, the "minimal" algorithm, identical to torchao's
``ScaleCalculationMode.FLOOR``):

* ``shared_exp = E(amax) - emax``, where ``E(amax)`` is the unbiased exponent
  *field* of the block's float32 absolute maximum (``((bits >> 23) & 0xFF) -
  127``), clamped to ``[-127, 127]``.  A block of zeros or of float32
  subnormals therefore gets the smallest scale 2^-127 (byte 0x00); a block
  whose maximum is +-Inf gets ``min(128 - emax, 127)`` (the Inf saturates, it
  does not poison the block).  A block that contains a NaN gets the NaN scale
  (byte 0xFF); its elements are stored as +0 and dequantize to NaN.
* ``P_i = x_i / 2^shared_exp`` rounded to nearest, ties to even, into the
  element format, keeping the element format's subnormals, and saturating at
  +-max normal (never Inf/NaN; +-Inf inputs saturate to +-max normal).  The
  sign of zero is kept (FP formats).  MXINT8 elements are
  ``round_half_even(x_i / X * 64)`` clipped to ``[-127, 127]`` (symmetric;
  -128 is never produced).
* Dequantization: ``P_i * 2^(byte - 127)``, NaN for byte 0xFF.  A saturated
  Inf element of an FP format (``max_normal * 2^(128 - emax)`` >= 2^128)
  overflows float32 back to +-Inf, so +-Inf round-trips; for MXINT8 it stays
  finite (``127/64 * 2^127``).

All of this is computed with integer operations on the float32 bit pattern:
XLA on CPU flushes float32 subnormals in floating-point arithmetic, so
``x * 2.0**-shared_exp`` would not be exact for subnormal inputs or results.
Dequantization likewise builds the float32 product ``P_i * 2^(byte-127)``
bit by bit, then casts to the requested dtype.  For these formats the product
is always exact in float32 (the smallest element step times 2^-127 is at
least 2^-143, above the float32 subnormal step 2^-149) unless it reaches
2^128 and overflows to Inf; the round-to-nearest-even path for the float32
subnormal range is kept for completeness.

Storage in JAX: elements use the element dtype where XLA supports it
(float8_e4m3fn, float8_e5m2, float4_e2m1fn, int8).  XLA has no float6 type,
so MXFP6 elements are held as ``uint8`` bit patterns in the low 6 bits (the
same byte layout as ``ml_dtypes.float6_*``: ``np.asarray(q.elements).view(
fmt.element_dtype)`` gives the ml_dtypes array).  ``MXFormat.storage_dtype``
names the dtype actually used; ``MXArray.element_bits()`` gives the bit
patterns of any format as uint8.

``MXArray.nbytes`` is the packed size: ``ceil(size * element_bits / 8)`` bytes
for the logical elements (no padding) plus one byte per scale.

Lengths that are not a multiple of ``block_size`` are padded internally with
zeros for the block maximum (the spec's zero padding); the elements keep the
input's shape and the scales have ``ceil(n / block_size)`` entries along the
blocked axis.  Inputs of any real dtype are converted to float32 first
(float16 and bfloat16 exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

__all__ = [
    "ALIASES",
    "DEFAULT_BLOCK_SIZE",
    "FORMATS",
    "MXArray",
    "MXFormat",
    "MXType",
    "SCALE_DTYPE",
    "dequantize",
    "fake_quantize",
    "format_names",
    "get_format",
    "quantize",
]

DEFAULT_BLOCK_SIZE = 32
SCALE_DTYPE = np.dtype(ml_dtypes.float8_e8m0fnu)
SCALE_BIAS = 127
SCALE_NAN_BYTE = 0xFF


# --------------------------------------------------------------------------
# Format catalogue
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """One MX element format.

    ``emax`` is the exponent of the largest power of two representable in the
    element format (``floor(log2(max_normal))``).  For the FP formats
    ``exponent_bits``/``mantissa_bits``/``bias`` describe the element encoding
    and ``max_code`` is the magnitude bit pattern of ``max_normal``.  MXINT8
    has ``exponent_bits == 0``, ``mantissa_bits == 6`` (fraction bits) and
    ``max_code == 127``.
    """

    name: str
    element_dtype: np.dtype
    element_bits: int
    emax: int
    max_normal: float
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_code: int
    is_int: bool = False

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal element (FP formats)."""
        return 1 - self.bias

    @property
    def min_normal(self) -> float:
        if self.is_int:
            return 2.0 ** -self.mantissa_bits
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        if self.is_int:
            return 2.0 ** -self.mantissa_bits
        return 2.0 ** (self.emin - self.mantissa_bits)

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype of ``MXArray.elements`` (uint8 bit patterns for FP6)."""
        if self.element_bits == 6:
            return np.dtype(np.uint8)
        return self.element_dtype

    @property
    def sign_shift(self) -> int:
        """Bit position of the sign bit in an FP element's bit pattern."""
        return self.exponent_bits + self.mantissa_bits

    def __str__(self) -> str:
        return self.name


def _fp(name, dtype, bits, ebits, mbits, bias, emax, max_normal, max_code):
    return MXFormat(
        name=name,
        element_dtype=np.dtype(dtype),
        element_bits=bits,
        emax=emax,
        max_normal=float(max_normal),
        exponent_bits=ebits,
        mantissa_bits=mbits,
        bias=bias,
        max_code=max_code,
    )


FORMATS: dict[str, MXFormat] = {
    f.name: f
    for f in (
        _fp("mxfp8_e4m3", ml_dtypes.float8_e4m3fn, 8, 4, 3, 7, 8, 448.0, 0x7E),
        _fp("mxfp8_e5m2", ml_dtypes.float8_e5m2, 8, 5, 2, 15, 15, 57344.0, 0x7B),
        _fp("mxfp6_e3m2", ml_dtypes.float6_e3m2fn, 6, 3, 2, 3, 4, 28.0, 0x1F),
        _fp("mxfp6_e2m3", ml_dtypes.float6_e2m3fn, 6, 2, 3, 1, 2, 7.5, 0x1F),
        _fp("mxfp4_e2m1", ml_dtypes.float4_e2m1fn, 4, 2, 1, 1, 2, 6.0, 0x7),
        MXFormat(
            name="mxint8",
            element_dtype=np.dtype(np.int8),
            element_bits=8,
            emax=0,
            max_normal=127.0 / 64.0,
            exponent_bits=0,
            mantissa_bits=6,
            bias=0,
            max_code=127,
            is_int=True,
        ),
    )
}

ALIASES: dict[str, str] = {
    "mx8": "mxfp8_e4m3",
    "mx6": "mxfp6_e2m3",
    "mx4": "mxfp4_e2m1",
    "mxfp4": "mxfp4_e2m1",  # OCP MX v1.0's only FP4 element type is E2M1
}
# names of a family with more than one element type: an error lists them
AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "mxfp8": ("mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp6": ("mxfp6_e2m3", "mxfp6_e3m2"),
}


def format_names() -> tuple[str, ...]:
    """The canonical format names (aliases are in ``ALIASES``)."""
    return tuple(FORMATS)


def get_format(name_or_format: "str | MXFormat | MXType") -> MXFormat:
    """Look up an MX format by name or alias (an ``MXFormat`` passes through)."""
    if isinstance(name_or_format, MXFormat):
        return name_or_format
    if isinstance(name_or_format, MXType):
        return name_or_format.format
    if isinstance(name_or_format, str):
        key = name_or_format.strip().lower()
        key = ALIASES.get(key, key)
        if key in FORMATS:
            return FORMATS[key]
        if key in AMBIGUOUS:
            raise ValueError(f"MX format {name_or_format!r} is ambiguous: OCP MX has "
                             f"{' and '.join(AMBIGUOUS[key])}; name one of them")
    valid = ", ".join(FORMATS)
    aliases = ", ".join(f"{a} (= {n})" for a, n in ALIASES.items())
    raise ValueError(
        f"unknown MX format {name_or_format!r}; valid names: {valid}; "
        f"aliases: {aliases}"
    )


def _check_block_size(block_size: Any, axis_length: int | None = None) -> int:
    """A valid block size: a positive int, and beyond the spec's 32 no longer
    than the axis it blocks (a larger block is all padding, and a huge one
    would make XLA allocate, or abort on, the padded array)."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"MX block_size must be a positive int, got {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"MX block_size must be positive, got {block_size}")
    if axis_length is not None and block_size > max(DEFAULT_BLOCK_SIZE, axis_length):
        raise ValueError(f"MX block_size {block_size} is longer than the blocked axis "
                         f"({axis_length} elements); use at most {max(DEFAULT_BLOCK_SIZE, axis_length)} "
                         f"(OCP MX uses {DEFAULT_BLOCK_SIZE})")
    return int(block_size)


def _normalize_axis(axis: int, ndim: int) -> int:
    if ndim == 0:
        raise ValueError("MX quantization needs an array with at least one axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


@dataclasses.dataclass(frozen=True)
class MXType:
    """Element type of an MX tensor in the compiler IR: format + block size.

    ``MXType("mx4")`` is accepted and normalized to the canonical format.
    """

    format: MXFormat
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format))
        object.__setattr__(self, "block_size", _check_block_size(self.block_size))

    @property
    def name(self) -> str:
        return str(self)

    @property
    def element_bits(self) -> int:
        return self.format.element_bits

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per value: element bits + 8 / block_size."""
        return self.format.element_bits + 8.0 / self.block_size

    def scale_shape(self, shape: tuple[int, ...], axis: int = -1) -> tuple[int, ...]:
        """Shape of the scale tensor for a value tensor of ``shape``."""
        shape = tuple(int(d) for d in shape)
        ax = _normalize_axis(axis, len(shape))
        nblocks = -(-shape[ax] // self.block_size)
        return shape[:ax] + (nblocks,) + shape[ax + 1 :]

    def nbytes(self, shape: tuple[int, ...], axis: int = -1) -> int:
        """Packed bytes of an MX tensor of ``shape`` (see ``MXArray.nbytes``)."""
        size = math.prod(int(d) for d in shape)
        nscales = math.prod(self.scale_shape(shape, axis))
        return -(-size * self.format.element_bits // 8) + nscales

    def __str__(self) -> str:
        return f"{self.format.name}[{self.block_size}]"


# --------------------------------------------------------------------------
# MXArray
# --------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class MXArray:
    """An MX-quantized tensor: ``elements`` and per-block ``scales``.

    * ``elements``: the input's shape, dtype ``format.storage_dtype``.
    * ``scales``: the input's shape with the blocked axis replaced by
      ``ceil(n / block_size)``, dtype ``float8_e8m0fnu``.

    Pytree children are ``(elements, scales)``; the format, block size and
    blocked axis are static.  The axis is kept counted from the end, so that
    batching transformations that prepend axes (``jax.vmap`` with the default
    ``out_axes=0``) leave the metadata valid; ``.axis`` is non-negative.
    """

    __slots__ = ("elements", "scales", "format", "block_size", "_axis_from_end")

    def __init__(self, elements, scales, format, axis: int = -1,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.elements = elements
        self.scales = scales
        self.format = get_format(format)
        self.block_size = _check_block_size(block_size)
        ndim = len(elements.shape)
        self._axis_from_end = _normalize_axis(axis, ndim) - ndim
        self.check()

    def check(self) -> None:
        """Raise unless the invariants hold: elements in the format's storage
        dtype, scales in ``float8_e8m0fnu`` with one per block (a tree-mapped
        or hand-built MXArray that breaks them would decode to wrong numbers)."""
        for name in ("elements", "scales"):
            if not hasattr(getattr(self, name), "shape") or not hasattr(getattr(self, name), "dtype"):
                raise TypeError(f"MXArray {name} must be an array, got "
                                f"{type(getattr(self, name)).__name__}")
        if np.dtype(self.elements.dtype) != self.format.storage_dtype:
            raise TypeError(
                f"MXArray({self.format.name}) elements have dtype {np.dtype(self.elements.dtype)}; "
                f"the format stores {self.format.storage_dtype} (was the MXArray tree-mapped? map "
                f"the dequantized values instead)")
        if np.dtype(self.scales.dtype) != np.dtype(ml_dtypes.float8_e8m0fnu):
            raise TypeError(f"MXArray scales have dtype {np.dtype(self.scales.dtype)}; expected "
                            f"float8_e8m0fnu (one E8M0 byte per block)")
        expected = MXType(self.format, self.block_size).scale_shape(
            self.elements.shape, self._axis_from_end)
        if tuple(self.scales.shape) != expected:
            raise ValueError(
                f"MX scales shape {tuple(self.scales.shape)} does not match elements "
                f"shape {tuple(self.elements.shape)} (expected {expected})")

    # pytree protocol -----------------------------------------------------
    def tree_flatten(self):
        return (self.elements, self.scales), (
            self.format, self.block_size, self._axis_from_end)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.elements, obj.scales = children
        obj.format, obj.block_size, obj._axis_from_end = aux
        return obj

    # array-like metadata ---------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.elements.shape)

    @property
    def ndim(self) -> int:
        return len(self.elements.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def axis(self) -> int:
        return self.ndim + self._axis_from_end

    @property
    def dtype(self) -> MXType:
        return MXType(self.format, self.block_size)

    @property
    def num_blocks(self) -> int:
        return -(-self.shape[self.axis] // self.block_size)

    @property
    def nbytes(self) -> int:
        """Packed storage bytes: ``ceil(size * element_bits / 8)`` + one byte
        per scale.  Only the logical elements are counted (the zero padding
        of a partial last block is not stored)."""
        return self.dtype.nbytes(self.shape, self.axis)

    def element_bits(self) -> jax.Array:
        """The elements' bit patterns as uint8 (int8 two's complement for
        MXINT8, low 4/6 bits for FP4/FP6)."""
        return _element_bits(self.elements, self.format)

    def scale_bits(self) -> jax.Array:
        """The scale bytes as uint8 (biased exponent, 0xFF = NaN)."""
        return lax.bitcast_convert_type(self.scales, jnp.uint8)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        return (f"MXArray({self.dtype}, shape={self.shape}, axis={self.axis}, "
                f"nbytes={self.nbytes})")


# --------------------------------------------------------------------------
# Integer kernels on float32 bit patterns
# --------------------------------------------------------------------------

_U32 = jnp.uint32
_I32 = jnp.int32
# float32 bit-field masks as typed constants (Python ints above 2^31 do not
# fit JAX's weakly typed int32 literals)
_SIGN_MASK = np.uint32(0x80000000)
_ABS_MASK = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_MANT_MASK = np.uint32(0x007FFFFF)
_HIDDEN_BIT = np.uint32(0x00800000)


def _shift_right_rne(sig, shift):
    """round_half_even(sig / 2^shift) for uint32 ``sig`` and 0 <= shift <= 31."""
    shift_u = shift.astype(_U32)
    q = sig >> shift_u
    rem = sig - (q << shift_u)
    half = (jnp.uint32(1) << shift_u) >> 1
    up = (shift > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    return q + up.astype(_U32)


def _split_f32(bits):
    """(sign, integer significand, exponent of its LSB, floor(log2|x|))."""
    sign = bits >> 31
    efield = ((bits >> 23) & 0xFF).astype(_I32)
    mant = bits & _MANT_MASK
    sig = jnp.where(efield > 0, mant | _HIDDEN_BIT, mant)
    lsb_exp = jnp.maximum(efield, 1) - 150
    log2 = 31 - lax.clz(sig).astype(_I32) + lsb_exp  # -150 for zero
    return sign, sig, lsb_exp, log2


def _encode_fp(bits, shared, fmt: MXFormat):
    """Bit patterns (uint8) of round_half_even(x / 2^shared) in an FP format."""
    m, emin = fmt.mantissa_bits, fmt.emin
    sign, sig, lsb_exp, log2 = _split_f32(bits)
    te = jnp.clip(log2 - shared, emin - 64, fmt.emax + 64)  # exponent of x/X
    step_exp = jnp.maximum(te, emin) - m                     # element grid step
    shift = jnp.clip(step_exp - (lsb_exp - shared), 0, 25)   # sig < 2^24
    k = _shift_right_rne(sig, shift).astype(_I32)
    code = ((jnp.maximum(te, emin) - emin) << m) + k
    is_inf = (bits & _ABS_MASK) == _INF_BITS
    code = jnp.where(is_inf | (code > fmt.max_code), fmt.max_code, code)
    return ((sign.astype(_I32) << fmt.sign_shift) | code).astype(jnp.uint8)


def _encode_int8(bits, shared, fmt: MXFormat):
    """round_half_even(x / 2^shared * 64) clipped to [-127, 127], as int8."""
    sign, sig, lsb_exp, _ = _split_f32(bits)
    shift = jnp.clip(shared - fmt.mantissa_bits - lsb_exp, 0, 25)
    k = _shift_right_rne(sig, shift).astype(_I32)
    is_inf = (bits & _ABS_MASK) == _INF_BITS
    k = jnp.where(is_inf, fmt.max_code, jnp.minimum(k, fmt.max_code))
    return jnp.where(sign == 1, -k, k).astype(jnp.int8)


@functools.lru_cache(maxsize=None)
def _value_table(fmt: MXFormat) -> np.ndarray:
    """float32 value of every bit pattern of an FP element format."""
    codes = np.arange(2**fmt.element_bits, dtype=np.uint8)
    return codes.view(fmt.element_dtype).astype(np.float32)


def _bits_to_storage(codes, fmt: MXFormat):
    if fmt.is_int or fmt.element_bits == 6:
        return codes
    if fmt.element_bits == 8:
        return lax.bitcast_convert_type(codes, fmt.element_dtype)
    # float4: XLA packs two per byte in bitcasts; go through the exact value.
    values = jnp.asarray(_value_table(fmt))[codes.astype(_I32)]
    return values.astype(fmt.element_dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _element_bits(elements, fmt: MXFormat):
    if fmt.is_int:
        return lax.bitcast_convert_type(elements, jnp.uint8)
    if fmt.element_bits == 6:
        return elements
    if fmt.element_bits == 8:
        return lax.bitcast_convert_type(elements, jnp.uint8)
    # float4 (bitcasts pack two per byte): the code of an exact element value
    # is the number of positive table entries not above its magnitude.
    values = elements.astype(jnp.float32)
    positive = _value_table(fmt)[1 : 2 ** (fmt.element_bits - 1)]
    code = jnp.sum(jnp.abs(values)[..., None] >= positive, axis=-1, dtype=jnp.uint8)
    sign = jnp.signbit(values).astype(jnp.uint8) << fmt.sign_shift
    return sign | code


def _element_values(elements, fmt: MXFormat):
    """Exact float32 value of each element (without the block scale)."""
    if fmt.is_int:
        return elements.astype(jnp.float32) * jnp.float32(2.0**-fmt.mantissa_bits)
    if fmt.element_bits == 6:
        table = jnp.asarray(_value_table(fmt))
        return table[(elements & 0x3F).astype(_I32)]
    return elements.astype(jnp.float32)


def _scale_f32(values, scale_exp):
    """values * 2^scale_exp in float32, exactly rounded (subnormal-safe).

    ``values`` are float32 normals, zeros, Inf or NaN; ``scale_exp`` is an
    int32 broadcastable to ``values``.
    """
    bits = lax.bitcast_convert_type(values, _U32)
    sign = bits & _SIGN_MASK
    efield = ((bits >> 23) & 0xFF).astype(_I32)
    mant = bits & _MANT_MASK
    new_e = efield + scale_exp
    normal = sign | (jnp.clip(new_e, 1, 254).astype(_U32) << 23) | mant
    sub_shift = jnp.clip(1 - new_e, 0, 25)
    subnormal = sign | _shift_right_rne(mant | _HIDDEN_BIT, sub_shift)
    out = jnp.where(new_e >= 1, normal, subnormal)
    out = jnp.where(new_e >= 255, sign | _INF_BITS, out)
    out = jnp.where((efield == 0) | (efield == 255), bits, out)  # 0, Inf, NaN
    return lax.bitcast_convert_type(out, jnp.float32)


# --------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------


def _to_f32(x):
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
            or x.dtype == jnp.bool_):
        raise TypeError(f"MX quantize needs a real-valued array, got dtype {x.dtype}")
    return x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mx_quantize(x, fmt: MXFormat, axis: int, block_size: int):
    x = _to_f32(x)
    xt = jnp.moveaxis(x, axis, -1)
    n = xt.shape[-1]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    if pad:
        xt = jnp.pad(xt, [(0, 0)] * (xt.ndim - 1) + [(0, pad)])
    bits = lax.bitcast_convert_type(xt, _U32)
    bits = bits.reshape(xt.shape[:-1] + (nblocks, block_size))

    amax = jnp.max(bits & _ABS_MASK, axis=-1, initial=np.uint32(0))
    block_nan = amax > _INF_BITS
    amax_exp = (amax >> 23).astype(_I32) - 127
    shared = jnp.clip(amax_exp - fmt.emax, -SCALE_BIAS, SCALE_BIAS)
    scale_bytes = jnp.where(block_nan, SCALE_NAN_BYTE, shared + SCALE_BIAS)
    scale_bytes = scale_bytes.astype(jnp.uint8)

    encode = _encode_int8 if fmt.is_int else _encode_fp
    codes = encode(bits, shared[..., None], fmt)
    codes = jnp.where(block_nan[..., None], jnp.zeros((), codes.dtype), codes)
    codes = codes.reshape(xt.shape[:-1] + (nblocks * block_size,))[..., :n]

    elements = _bits_to_storage(jnp.moveaxis(codes, -1, axis), fmt)
    scales = lax.bitcast_convert_type(jnp.moveaxis(scale_bytes, -1, axis),
                                      ml_dtypes.float8_e8m0fnu)
    return elements, scales


def quantize(x, fmt, axis: int = -1,
             block_size: int = DEFAULT_BLOCK_SIZE) -> MXArray:
    """Quantize ``x`` to MX format ``fmt`` in blocks of ``block_size`` along ``axis``.

    Works on NumPy and JAX arrays, under ``jax.jit`` and ``jax.vmap``.
    """
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    axis = _normalize_axis(axis, x.ndim)
    block_size = _check_block_size(block_size, x.shape[axis])
    elements, scales = _mx_quantize(x, fmt, axis, block_size)
    return MXArray(elements, scales, fmt, axis, block_size)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _mx_dequantize(elements, scales, fmt: MXFormat, axis: int,
                     block_size: int, dtype):
    values = jnp.moveaxis(_element_values(elements, fmt), axis, -1)
    scale_bytes = jnp.moveaxis(lax.bitcast_convert_type(scales, jnp.uint8), axis, -1)
    n, nblocks = values.shape[-1], scale_bytes.shape[-1]
    pad = nblocks * block_size - n
    if pad:
        values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    values = values.reshape(values.shape[:-1] + (nblocks, block_size))
    scale_exp = scale_bytes.astype(_I32)[..., None] - SCALE_BIAS
    out = _scale_f32(values, scale_exp)
    out = jnp.where(scale_exp == SCALE_NAN_BYTE - SCALE_BIAS, jnp.float32(jnp.nan), out)
    out = out.reshape(out.shape[:-2] + (nblocks * block_size,))[..., :n]
    return jnp.moveaxis(out, -1, axis).astype(dtype)


def dequantize(q: MXArray, dtype=jnp.float32) -> jax.Array:
    """Values ``P_i * 2^(scale - 127)`` of an ``MXArray`` as ``dtype``.

    The product is formed exactly in float32 (rounded to nearest-even only in
    the float32 subnormal range); a NaN scale (0xFF) makes its whole block
    NaN.  The float32 result is then cast to ``dtype``.
    """
    if not isinstance(q, MXArray):
        raise TypeError(f"dequantize expects an MXArray, got {type(q).__name__}")
    q.check()
    return _mx_dequantize(q.elements, q.scales, q.format, q.axis, q.block_size,
                            np.dtype(dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _fake_quantize(x, fmt: MXFormat, axis: int, block_size: int):
    q = quantize(x, fmt, axis, block_size)
    return dequantize(q, x.dtype)


@_fake_quantize.defjvp
def _fake_quantize_jvp(fmt, axis, block_size, primals, tangents):
    (x,), (t,) = primals, tangents
    return _fake_quantize(x, fmt, axis, block_size), t


def fake_quantize(x, fmt, axis: int = -1,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through
    (identity) gradient."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"fake_quantize needs a floating-point array, got {x.dtype}")
    fmt = get_format(fmt)
    block_size = _check_block_size(block_size)
    axis = _normalize_axis(axis, x.ndim)
    return _fake_quantize(x, fmt, axis, block_size)
