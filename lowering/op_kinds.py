"""Op kinds of the MTIA IR and the kind of kernel each becomes.

One table, used by the importer (which primitives become generic ops) and
by the cost model (which rule prices each op).

- elementwise:    one vector-unit operation per output element
- transcendental: one special-function-unit evaluation per output element
- reduction:      one vector operation per input element folded into an output
- cumulative:     a prefix scan along one axis: one vector operation per element
- sort:           a comparison sort (or top-k selection) along one axis
- gather:         indexed reads: moves bytes, no arithmetic
- scatter:        indexed writes, combining each update into the operand
- window:         pooling: a reduction over a sliding window, and its gradients
- convolution:    matrix engine (Dot Product Engine), as an implicit GEMM
- contraction:    matrix engine (Dot Product Engine)
- random:         counter-based random bits (integer hash rounds on the vector units)
- data_movement:  a kernel that only moves bytes (DMA)
- view:           metadata only (shape change, identity); no kernel
- constant:       baked into the program; no kernel
- accelerated:    mtia-jax's own primitives for MTIA's dedicated hardware
- host:           no MTIA kernel: runs on the host CPU, operands and results
                  cross the host link
"""

from __future__ import annotations

_GROUPS = {
    "elementwise": (
        "add", "add_any", "sub", "mul", "div", "rem", "neg", "max", "min", "integer_pow",
        "abs", "sign", "square", "floor", "ceil", "round", "clamp", "nextafter", "eq", "ne",
        "lt", "le", "gt", "ge", "eq_to", "lt_to", "le_to", "and", "or", "xor", "not",
        "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
        "clz", "select_n",
        "convert_element_type", "bitcast_convert_type", "reduce_precision", "is_finite",
    ),
    "transcendental": (
        "exp", "exp2", "log", "log1p", "expm1", "pow", "tanh", "logistic", "sqrt", "rsqrt",
        "cbrt", "erf", "erfc", "erf_inv", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
        "sinh", "cosh", "asinh", "acosh", "atanh", "lgamma", "digamma", "polygamma", "zeta",
        "igamma", "igammac", "igamma_grad_a", "bessel_i0e", "bessel_i1e",
        "regularized_incomplete_beta",
    ),
    "reduction": (
        "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
        "reduce_xor", "argmax", "argmin", "reduce",
    ),
    "cumulative": ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"),
    "sort": ("sort", "top_k", "approx_top_k"),
    "gather": ("gather",),
    "scatter": ("scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min",
                "scatter-max"),
    "window": (
        "reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
        "select_and_scatter_add", "select_and_gather_add",
    ),
    "convolution": ("conv_general_dilated",),
    "contraction": ("dot_general",),
    "random": (
        "threefry2x32", "random_bits", "random_seed", "random_fold_in", "random_split",
        "rng_bit_generator", "random_gamma",
    ),
    "data_movement": (
        "broadcast_in_dim", "transpose", "concatenate", "slice", "dynamic_slice",
        "dynamic_update_slice", "iota", "copy", "tile", "pad", "rev", "split", "stack",
        "unstack",
        "iota_2x32_shape",  # the (hi, lo) uint32 words of a 64-bit iota (counter-based RNGs)
    ),
    "view": (
        "reshape", "squeeze", "expand_dims", "stop_gradient", "optimization_barrier",
        "random_wrap", "random_unwrap", "random_clone",
        "shard_slice",  # this device's block of a value every device holds
        "sharding_constraint",  # the identity on values; the partition pass reads it
    ),
    # platform_index: which branch of lax.platform_dependent runs; resolved
    # when the host program is compiled, a scalar immediate on the device
    "constant": ("constant", "platform_index", "axis_index"),
    # communication between the devices of a mesh (``lowering.collectives``)
    "collective": ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute"),
    # mtia-jax's own primitives (``mtia_jax.primitives``): the operations MTIA
    # has dedicated hardware for; work rules in ``runtime.accelerated``
    "accelerated": (
        "mx_matmul", "flash_attention", "paged_attention", "rms_norm", "layer_norm", "swiglu",
        "moe_ffn", "embedding_bag",
        # moe_ffn split over the experts (expert parallelism): its per-device kernels
        "moe_dispatch", "moe_experts", "moe_combine",
        # a user's Pallas kernel (``lowering.pallas``): one opaque kernel, costed
        # from its grid and BlockSpecs; no pass fuses into it or changes its dtypes
        "pallas_call",
    ),
    "host": ("host_fallback",),
}

KIND_CATEGORY: dict[str, str] = {kind: group for group, kinds in _GROUPS.items() for kind in kinds}

# kinds that are not JAX primitives: created by the importer itself
_NON_PRIMITIVE_KINDS = frozenset({"constant", "host_fallback", "all_reduce", "permute", "shard_slice",
                                  "pallas_call"})  # pallas_call: its own import rule

# kinds that are JAX primitives imported one-to-one as generic ops
GENERIC_PRIMITIVES: frozenset[str] = frozenset(KIND_CATEGORY) - _NON_PRIMITIVE_KINDS

NO_KERNEL: frozenset[str] = frozenset({"view", "constant"})

# Primitives no MTIA kernel runs: imported as a ``host_fallback`` op that
# binds the original primitive on the host. Value: (why, what the user can do).
_NO_KERNEL_ADVICE = ("run it outside mtia_jax.jit, or keep it and accept the host round trip "
                     "(modeled in cost_analysis)")
_LINALG = ("a linear-algebra decomposition/solver with no MTIA kernel", _NO_KERNEL_ADVICE)
_COMPLEX = ("complex numbers have no MTIA datapath",
            "compute with the real and imaginary parts as separate real arrays, or " + _NO_KERNEL_ADVICE)
HOST_PRIMITIVES: dict[str, tuple[str, str]] = {
    **{name: _LINALG for name in (
        "cholesky", "cholesky_update", "lu", "lu_pivots_to_permutation", "qr", "geqrf",
        "geqp3", "householder_product", "ormqr", "svd", "eig", "eigh", "triangular_solve",
        "tridiagonal", "tridiagonal_solve", "schur", "hessenberg", "symmetric_product",
    )},
    "fft": ("an FFT, which has no MTIA kernel", _NO_KERNEL_ADVICE),
    **{name: _COMPLEX for name in ("complex", "real", "imag", "conj")},
}

# Callbacks into Python (``jax.debug.print``, ``jax.debug.callback``,
# ``jax.pure_callback``, ``io_callback``): they run on the host by design, as
# ``host_fallback`` ops (no warning); the round trip of their operands is modeled.
HOST_CALLBACKS: frozenset[str] = frozenset({"debug_print", "debug_callback", "pure_callback",
                                            "io_callback"})

# element types no MTIA kernel computes in: any kernel touching one runs on
# the host. Value: (why, what the user can do)
HOST_DTYPE_REASONS: dict[str, tuple[str, str]] = {
    "float64": ("float64 has no MTIA datapath",
                "compute in float32 or bfloat16 (cast the inputs, or leave jax_enable_x64 off)"),
    "complex64": _COMPLEX,
    "complex128": _COMPLEX,
}
