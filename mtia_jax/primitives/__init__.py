"""mtia-jax's own JAX primitives: the operations MTIA has dedicated hardware for.

Each module defines one primitive (or one family) with all its rules
together: abstract evaluation, JVP, batching, and a lowering of its reference
implementation so it also runs under plain ``jax.jit``. The compiler imports
them as MTIA IR ops of the same name, costed by ``runtime.accelerated``.
"""

from mtia_jax.primitives.embedding_bag import embedding_bag
from mtia_jax.primitives.flash_attention import flash_attention
from mtia_jax.primitives.moe_ffn import moe_ffn
from mtia_jax.primitives.mx_matmul import mx_matmul
from mtia_jax.primitives.norms import layer_norm, rms_norm
from mtia_jax.primitives.paged_attention import paged_attention
from mtia_jax.primitives.swiglu import swiglu

__all__ = ["embedding_bag", "flash_attention", "layer_norm", "moe_ffn", "mx_matmul", "paged_attention",
           "rms_norm", "swiglu"]
