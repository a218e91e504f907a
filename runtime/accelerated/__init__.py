"""Work rules for mtia-jax's own primitives (``mtia_jax.primitives``), the
operations MTIA has dedicated hardware for. One module per primitive family,
each with a ``RULES`` table ``op kind -> rule(op) -> OpWork``."""

from __future__ import annotations

from runtime.accelerated import attention, embedding, moe, mx_matmul, norms, pallas

RULES = {**mx_matmul.RULES, **attention.RULES, **norms.RULES, **moe.RULES, **embedding.RULES,
         **pallas.RULES}
