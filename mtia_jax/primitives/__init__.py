"""mtia-jax's own JAX primitives: the operations MTIA has dedicated hardware for.

Each module defines one primitive (or one family) with all its rules
together: abstract evaluation, JVP, batching, and a lowering of its reference
implementation so it also runs under plain ``jax.jit``. The compiler imports
them as MTIA IR ops of the same name, costed by ``runtime.accelerated``.
"""
