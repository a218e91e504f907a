"""mtia-jax: compile JAX programs for a software model of Meta's MTIA accelerators.

The package stays thin and resolves its public API lazily, so that the
compiler (``lowering``) and runtime (``runtime``) packages can import
``mtia_jax.mx`` and ``mtia_jax.chips`` without import cycles.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "jit": ("mtia_jax.api", "jit"),
    "Lowered": ("mtia_jax.api", "Lowered"),
    "Compiled": ("mtia_jax.api", "Compiled"),
    "mx": ("mtia_jax.mx", None),
    "chips": ("mtia_jax.chips", None),
    "config": ("mtia_jax.config", None),
    "devices": ("runtime.device", "devices"),
    "Device": ("runtime.device", "Device"),
    "profiler": ("mtia_jax.profiler", None),
    "pallas": ("mtia_jax.pallas", None),
    "estimate": ("mtia_jax.estimate", "estimate"),
    "make_mesh": ("mtia_jax.mesh", "make_mesh"),
    "Report": ("mtia_jax.estimate", "Report"),
    "estimate_pipeline": ("mtia_jax.pipeline", "estimate_pipeline"),
    "PipelineStage": ("mtia_jax.pipeline", "PipelineStage"),
    "PrecisionPolicy": ("mtia_jax.precision", "PrecisionPolicy"),
    "precision_policy": ("mtia_jax.precision", "precision_policy"),
    "sensitivity": ("mtia_jax.precision_search", "sensitivity"),
    "search": ("mtia_jax.precision_search", "search"),
    "errors": ("mtia_jax.errors", None),
    "primitives": ("mtia_jax.primitives", None),
    **{name: ("mtia_jax.primitives", name) for name in (
        "mx_matmul", "flash_attention", "paged_attention", "rms_norm", "layer_norm", "swiglu",
        "moe_ffn", "embedding_bag")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'mtia_jax' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
