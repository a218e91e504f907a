"""Op kinds of the MTIA IR and the kind of kernel each becomes.

One table, used by the importer (which primitives become generic ops) and
by the cost model (which rule prices each op).

- elementwise:    one vector-unit operation per output element
- transcendental: one special-function-unit evaluation per output element
- reduction:      one vector operation per input element
- contraction:    matrix engine (Dot Product Engine)
- data_movement:  a kernel that only moves bytes (DMA)
- view:           metadata only (shape change, identity); no kernel
- constant:       baked into the program; no kernel
"""

from __future__ import annotations

_GROUPS = {
    "elementwise": (
        "add", "sub", "mul", "div", "rem", "neg", "max", "min", "pow", "integer_pow",
        "abs", "sign", "square", "floor", "ceil", "round", "clamp", "eq", "ne", "lt", "le",
        "gt", "ge", "and", "or", "xor", "not", "select_n", "convert_element_type",
        "is_finite",
    ),
    "transcendental": (
        "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt",
        "erf", "erf_inv", "sin", "cos", "tan", "atan2",
    ),
    "reduction": (
        "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
        "reduce_xor", "argmax", "argmin",
    ),
    "contraction": ("dot_general",),
    "data_movement": (
        "broadcast_in_dim", "transpose", "concatenate", "slice", "dynamic_slice",
        "dynamic_update_slice", "iota", "copy", "tile",
    ),
    "view": ("reshape", "squeeze", "expand_dims", "stop_gradient"),
    "constant": ("constant",),
}

KIND_CATEGORY: dict[str, str] = {kind: group for group, kinds in _GROUPS.items() for kind in kinds}

# kinds that are JAX primitives imported one-to-one as generic ops
GENERIC_PRIMITIVES: frozenset[str] = frozenset(KIND_CATEGORY) - {"constant"}

NO_KERNEL: frozenset[str] = frozenset({"view", "constant"})
