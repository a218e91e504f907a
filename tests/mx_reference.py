"""Pure-NumPy reference for OCP MX v1.0 conversion, written from the spec.

Deliberately independent of ``mtia_jax.mx``: the element formats are taken
from ml_dtypes, every representable value is enumerated from its bit pattern,
and rounding is "nearest entry of the value table, ties to the even bit
pattern", computed in float64 (where ``x / 2^shared_exp`` is exact).

Scale rule (MX spec section 6.3 / torchao FLOOR): ``shared_exp`` is the
unbiased float32 exponent field of the block's absolute maximum minus the
element format's ``emax`` (largest power of two it can represent), clamped to
[-127, 127]; a block containing a NaN gets the scale byte 0xFF.  Elements
saturate at +-max normal; FP elements keep the input's sign (also on zero);
MXINT8 elements are round-half-even(x / X * 64) clipped to [-127, 127].

``quantize_ref`` returns ``(element bit patterns as uint8, scale bytes as
uint8)``; the element bytes of NaN-scale blocks are unspecified (0 here).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# name -> element dtype (None for MXINT8)
ELEMENT_DTYPES = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp4_e2m1": ml_dtypes.float4_e2m1fn,
    "mxint8": None,
}
ELEMENT_BITS = {
    "mxfp8_e4m3": 8, "mxfp8_e5m2": 8, "mxfp6_e3m2": 6,
    "mxfp6_e2m3": 6, "mxfp4_e2m1": 4, "mxint8": 8,
}
INT8_FRACTION_BITS = 6  # MXINT8 elements are fixed point 1.6


class FloatTable:
    """All non-negative finite values of an FP element format, sorted."""

    def __init__(self, dtype, bits: int):
        sign_bit = 1 << (bits - 1)
        codes = np.arange(sign_bit, dtype=np.uint8)           # sign bit clear
        values = codes.view(dtype).astype(np.float64)
        finite = np.isfinite(values)
        self.codes = codes[finite].astype(np.int64)
        self.values = values[finite]
        assert np.all(np.diff(self.values) > 0), "non-negative codes must be monotonic"
        self.sign_bit = sign_bit
        self.max = float(self.values[-1])
        # largest power of two <= max
        self.emax = int(np.floor(np.log2(self.max)))
        self.dtype = dtype
        self.bits = bits

    def round_magnitude(self, mag: np.ndarray) -> np.ndarray:
        """Code of the table value nearest to ``mag`` >= 0 (ties: even code),
        saturating at the largest value."""
        v, c = self.values, self.codes
        hi = np.searchsorted(v, mag, side="left")   # v[hi-1] < mag <= v[hi]
        hi_c = np.minimum(hi, len(v) - 1)
        lo_c = np.maximum(hi - 1, 0)
        mid = (v[lo_c] + v[hi_c]) / 2                # exact: few significant bits
        pick_hi = (mag > mid) | ((mag == mid) & (c[hi_c] % 2 == 0))
        code = np.where(pick_hi, c[hi_c], c[lo_c])
        code = np.where(hi >= len(v), c[-1], code)  # above max (incl. Inf): saturate
        code = np.where(hi == 0, c[0], code)         # mag == 0
        return code


_TABLES: dict[str, FloatTable] = {}


def table(name: str) -> FloatTable:
    if name not in _TABLES:
        _TABLES[name] = FloatTable(ELEMENT_DTYPES[name], ELEMENT_BITS[name])
    return _TABLES[name]


def emax(name: str) -> int:
    if ELEMENT_DTYPES[name] is None:
        return 0  # max 127/64 < 2
    return table(name).emax


def _blocks(x: np.ndarray, axis: int, block_size: int):
    xt = np.moveaxis(x, axis, -1)
    n = xt.shape[-1]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    xp = np.concatenate([xt, np.zeros(xt.shape[:-1] + (pad,), np.float32)], axis=-1)
    return xp.reshape(xt.shape[:-1] + (nblocks, block_size)), n


def quantize_ref(x, name: str, axis: int = -1, block_size: int = 32):
    """Reference MX quantization: (element bits uint8, scale bytes uint8)."""
    x = np.asarray(x).astype(np.float32)
    axis = axis % x.ndim
    xb, n = _blocks(x, axis, block_size)

    magnitude_bits = xb.view(np.uint32) & np.uint32(0x7FFFFFFF)
    amax_bits = magnitude_bits.max(axis=-1)
    has_nan = np.isnan(xb).any(axis=-1)
    amax_exponent = (amax_bits >> np.uint32(23)).astype(np.int64) - 127
    shared = np.clip(amax_exponent - emax(name), -127, 127)
    scale_bytes = np.where(has_nan, 255, shared + 127).astype(np.uint8)

    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.ldexp(xb.astype(np.float64), -shared[..., None])  # exact
    if ELEMENT_DTYPES[name] is None:
        with np.errstate(invalid="ignore", over="ignore"):
            ints = np.clip(np.rint(np.nan_to_num(scaled) * 2.0**INT8_FRACTION_BITS),
                           -127, 127)
        elem = ints.astype(np.int8).view(np.uint8)
    else:
        t = table(name)
        mag = np.nan_to_num(np.abs(scaled), nan=0.0, posinf=np.inf)
        code = t.round_magnitude(mag)
        code = code | np.where(np.signbit(xb), t.sign_bit, 0)
        elem = code.astype(np.uint8)
    elem = np.where(has_nan[..., None], np.uint8(0), elem)

    elem = elem.reshape(elem.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(elem, -1, axis), np.moveaxis(scale_bytes, -1, axis)


def element_values_ref(elem_bits: np.ndarray, name: str) -> np.ndarray:
    """float64 value of each element bit pattern (without the scale)."""
    elem_bits = np.asarray(elem_bits, np.uint8)
    if ELEMENT_DTYPES[name] is None:
        return elem_bits.view(np.int8).astype(np.float64) / 2.0**INT8_FRACTION_BITS
    return elem_bits.view(ELEMENT_DTYPES[name]).astype(np.float64)


def dequantize_ref(elem_bits, scale_bytes, name: str, axis: int = -1,
                   block_size: int = 32) -> np.ndarray:
    """float32 values: element value * 2^(scale - 127), NaN for scale 0xFF."""
    values = element_values_ref(elem_bits, name)
    axis = axis % values.ndim
    s = np.repeat(np.asarray(scale_bytes, np.int64), block_size, axis=axis)
    s = np.take(s, np.arange(values.shape[axis]), axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.ldexp(values, s - 127).astype(np.float32)  # one rounding
    return np.where(s == 255, np.float32(np.nan), out)
