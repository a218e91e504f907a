"""Pallas kernels (``jax.experimental.pallas.pallas_call``) in the MTIA IR.

A ``pallas_call`` is imported as ONE op of kind ``pallas_call``: the user's
kernel, run as written. No pass fuses into it, rewrites its dtypes (precision
policies leave it alone: its author chose them), tiles it or looks inside it
(``lowering.op_kinds``: category "accelerated"; ``lowering.passes.prologue``
gives it no prologue).

Numerics: the op is a generic op (``attrs["primitive"]`` is JAX's
``pallas_call`` primitive, ``attrs["params"]`` its params with
``interpret=True``), so the host program binds it in Pallas's interpret mode,
bit for bit what ``jax.jit`` of the same function with ``interpret=True``
computes.

Attributes (the contract with the cost model, ``runtime.accelerated.pallas``):

- ``primitive`` (JAX primitive; not printed): ``pallas_call``.
- ``params`` (dict; not printed): the primitive's params with
  ``interpret=True``. ``params["jaxpr"]`` is the kernel body,
  ``params["grid_mapping"]`` its grid and ``block_mappings`` (operands, then
  results; ``index_map_jaxpr`` the index map of each).
- ``name`` (str): the kernel's name, ``name=`` or its function's.
- ``grid`` (tuple[int, ...]): a dimension per ``pl.program_id`` axis; ``()``
  is one step.
- ``blocks`` (tuple[tuple[int | None, ...], ...]): per operand, its block
  shape: block sizes, None for a squeezed dim (``None`` / ``pl.Squeezed()``).
- ``out_blocks`` (same type): per result.
- ``dimension_semantics`` (tuple[str, ...], optional): per grid dim,
  "parallel", "arbitrary", ... from ``compiler_params``
  (``pltpu.CompilerParams``, ``mtia_jax.pallas.CompilerParams``; any object
  with a ``dimension_semantics``); dims added by ``jax.vmap`` are
  "parallel". Absent when the kernel gives none and was not vmapped.
- ``element_dims`` (tuple[tuple[int, ...], ...], optional): per operand, then
  per result, its ``pl.Element`` dims (there the index map gives an element
  offset, not a block index); present when there are any.
- ``memory_spaces`` (tuple[str, ...], optional): per operand, then per
  result, its BlockSpec's memory space ("default", "any", "smem", ...);
  present when one is not "default" (an "any" operand is not blocked: the
  kernel gets the whole array).
- ``scratch`` (tuple[str, ...], optional): the scratch buffers' types
  (``scratch_shapes``), e.g. "f32[8,128]".
- ``aliases`` (tuple[tuple[int, int], ...], optional):
  ``input_output_aliases`` as (operand, result) pairs sharing a buffer.
- ``effects`` (True, optional): the body has side effects
  (``pl.debug_print``): never merged nor dropped, as under ``jax.jit``.

Features outside the portable subset raise ``UnsupportedOperationError``
naming the feature, the user's line and what to do instead
(``_check_supported``): a core mesh (``pl.kernel``, ``pl.core_map``),
dynamic grid bounds, scalar prefetch (``PrefetchScalarGridSpec``),
``pl.BoundedSlice`` / ``pl.Indirect`` block dims, and (``_check_runs_on_host``)
a body using a primitive Pallas's interpret mode cannot run on the host
(TPU PRNG, Triton inline assembly, ...). ``jax.grad`` of a kernel fails in
JAX itself; ``autodiff_error`` says so clearly.
"""

from __future__ import annotations

import os
import re
import traceback
from typing import Any

import jax
from jax.extend import core as jcore

from lowering.ir import Op, SourceLoc, TensorType, Value
from mtia_jax.errors import UnsupportedOperationError


def _unsupported(builder, feature: str, advice: str):
    return UnsupportedOperationError(f"pallas_call with {feature}", builder.current_source,
                                     advice=advice)


def _block_dim(dim) -> int | None:
    """A BlockSpec dimension as the IR prints it: its block size (``pl.Blocked``
    or ``pl.Element``), None if squeezed."""
    from jax._src.pallas import core as pallas_core

    if isinstance(dim, pallas_core.Squeezed):
        return None
    return int(dim.block_size)


def _block_kind_problem(dim) -> str | None:
    from jax._src.pallas import core as pallas_core

    if isinstance(dim, (pallas_core.Blocked, pallas_core.Squeezed, pallas_core.Element)):
        return None
    return type(dim).__name__


PARALLEL, ARBITRARY = "parallel", "arbitrary"
# the spellings of Pallas's backends (Mosaic's, Mosaic GPU's "sequential"):
# may a grid dimension's iterations run in parallel?
SEMANTICS = {"parallel": PARALLEL, "core_parallel": PARALLEL, "subcore_parallel": PARALLEL,
             "arbitrary": ARBITRARY, "sequential": ARBITRARY}


def given_semantics(params: dict) -> tuple[str, ...] | None:
    """The kernel's own ``dimension_semantics`` from ``compiler_params`` (a
    backend's CompilerParams, ``mtia_jax.pallas.CompilerParams``, or the
    older ``{"mosaic": {...}}`` dict), lower-cased; None if it gives none."""
    cp = params.get("compiler_params")
    given = getattr(cp, "dimension_semantics", None)
    if given is None and isinstance(cp, dict):
        given = next((inner["dimension_semantics"] for inner in (cp, *cp.values())
                      if isinstance(inner, dict) and inner.get("dimension_semantics") is not None), None)
    return None if given is None else tuple(str(getattr(x, "value", x)).lower() for x in given)


def dimension_semantics(params: dict, grid_mapping) -> tuple[str, ...]:
    """Per grid dim, "parallel" or "arbitrary": the kernel's semantics on its
    own dims (none given: all arbitrary, Pallas TPU's default), the dims
    ``jax.vmap`` added parallel. ValueError for an unknown value or one
    entry too many or too few."""
    rank, vmapped = len(grid_mapping.grid), tuple(grid_mapping.vmapped_dims)
    given = given_semantics(params)
    if given is None:
        given = (ARBITRARY,) * (rank - len(vmapped))
    unknown = [x for x in given if x not in SEMANTICS]
    if unknown:
        raise ValueError(f"unknown grid dimension semantics {unknown}; use one of {sorted(SEMANTICS)}")
    if len(given) == rank:  # already covers the vmapped dims
        return tuple(SEMANTICS[x] for x in given)
    if len(given) != rank - len(vmapped):
        raise ValueError(f"dimension_semantics {given} has {len(given)} entries for a grid of "
                         f"{rank - len(vmapped)} dimensions {tuple(grid_mapping.grid)}; give one per "
                         f"grid dimension")
    rest = iter(SEMANTICS[x] for x in given)
    return tuple(PARALLEL if d in vmapped else next(rest) for d in range(rank))


def _kernel_name(params: dict) -> str:
    if params.get("name"):
        return str(params["name"])
    debug = getattr(params.get("jaxpr"), "debug_info", None)
    name = getattr(debug, "func_name", None)
    return str(name) if name else "kernel"


def _check_supported(builder, eqn: jcore.JaxprEqn) -> None:
    params = eqn.params
    gm = params["grid_mapping"]
    if params.get("mesh") is not None:
        raise _unsupported(builder, f"a core mesh ({type(params['mesh']).__name__})",
                           "write the kernel over a grid (pl.pallas_call(..., grid=...)); "
                           "TPU/GPU core meshes have no MTIA equivalent")
    if gm.num_dynamic_grid_bounds:
        raise _unsupported(builder, "dynamic grid bounds",
                           "give the grid as Python ints (static shapes), or mask the extra "
                           "steps in the kernel with pl.when")
    if gm.num_index_operands:
        raise _unsupported(builder, f"scalar prefetch ({gm.num_index_operands} prefetched "
                           "scalar operand(s), num_scalar_prefetch)",
                           "pass the scalars as ordinary (1-element) operands with a "
                           "pl.BlockSpec, and use pl.GridSpec / grid= instead of "
                           "PrefetchScalarGridSpec")
    for i, bm in enumerate(gm.block_mappings):
        for dim in bm.block_shape:
            kind = _block_kind_problem(dim)
            if kind is not None:
                raise _unsupported(builder, f"a {kind} block dimension in the BlockSpec of "
                                   f"{bm.origin}",
                                   "use block sizes (pl.Blocked, the default), pl.Element or "
                                   "None / pl.Squeezed() dims in pl.BlockSpec: Pallas's "
                                   "interpret mode, which runs the kernel here, has no "
                                   f"{kind} dims")


def _check_runs_on_host(builder, eqn: jcore.JaxprEqn, params: dict) -> None:
    """Lower the kernel in interpret mode for the host (no compile, no data:
    a few ms) so that a body using a backend-only primitive (TPU PRNG,
    Triton inline assembly, ...) fails here, at the user's line, rather than
    when the program first runs."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    try:
        jax.jit(lambda *args: eqn.primitive.bind(*args, **params)).trace(*avals).lower(
            lowering_platforms=("cpu",))
    except NotImplementedError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        found = re.search(r"rule for primitive '([^']+)'", message)
        what = f"a kernel using '{found.group(1)}'" if found else f"a kernel feature Pallas's " \
            f"interpreter lacks ({message})"
        raise _unsupported(builder, what,
                           "write that part of the kernel body with jnp / lax operations: it is "
                           "specific to a TPU or GPU backend and Pallas's interpret mode, which "
                           "runs the kernel here, has no implementation of it") from error


def _element_dims(block_mapping) -> tuple[int, ...]:
    from jax._src.pallas import core as pallas_core

    return tuple(d for d, dim in enumerate(block_mapping.block_shape)
                 if isinstance(dim, pallas_core.Element))


def _body_has_effects(jaxpr) -> bool:
    """Effects beyond reading and writing its own blocks (``pl.debug_print``):
    jax.jit keeps such a kernel even when nothing reads its results."""
    from jax._src.state import types as state_types

    return any(not isinstance(e, state_types.RefEffect) for e in getattr(jaxpr, "effects", ()))


def _memory_space(block_mapping) -> str:
    space = getattr(block_mapping.transformed_block_aval, "memory_space", None)
    return "default" if space is None else str(space)


def _scratch(gm) -> tuple[str, ...]:
    out = []
    for aval in gm.scratch_avals:
        shape = getattr(aval, "shape", None)
        dtype = getattr(aval, "dtype", None)
        if shape is None or dtype is None:
            out.append(str(aval))
        else:
            out.append(str(TensorType(tuple(int(d) for d in shape), dtype)))
    return tuple(out)


def _pallas_call_rule(builder, eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    _check_supported(builder, eqn)
    params = {**eqn.params, "interpret": True}
    _check_runs_on_host(builder, eqn, params)
    gm = params["grid_mapping"]
    blocks = tuple(tuple(_block_dim(d) for d in bm.block_shape) for bm in gm.block_mappings)
    n_in = gm.num_inputs
    attrs: dict[str, Any] = {
        "primitive": eqn.primitive,
        "params": params,
        "name": _kernel_name(params),
        "grid": tuple(int(g) for g in gm.grid),
        "blocks": blocks[:n_in],
        "out_blocks": blocks[n_in:],
    }
    if given_semantics(params) is not None or gm.vmapped_dims:
        try:
            attrs["dimension_semantics"] = dimension_semantics(params, gm)
        except ValueError as error:
            raise ValueError(f"mtia_jax.jit: the Pallas kernel '{attrs['name']}' at "
                             f"{builder.current_source}: {error}") from None
    elements = tuple(_element_dims(bm) for bm in gm.block_mappings)
    if any(elements):
        attrs["element_dims"] = elements
    spaces = tuple(_memory_space(bm) for bm in gm.block_mappings)
    if any(space != "default" for space in spaces):
        attrs["memory_spaces"] = spaces
    if gm.scratch_avals:
        attrs["scratch"] = _scratch(gm)
    if params.get("input_output_aliases"):
        attrs["aliases"] = tuple((int(i), int(o)) for i, o in params["input_output_aliases"])
    if eqn.effects or _body_has_effects(params["jaxpr"]):
        attrs["effects"] = True
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    builder.emit(Op(kind="pallas_call", operands=operands, results=results, attrs=attrs,
                    source=builder.current_source))
    return results


def _core_mesh_error(builder, eqn: jcore.JaxprEqn) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"a Pallas kernel over a core mesh (pl.kernel / pl.core_map: '{eqn.primitive.name}')",
        builder.current_source,
        advice="write the kernel as pl.pallas_call over a grid with a pl.BlockSpec per operand: "
               "TPU/GPU core meshes have no MTIA equivalent")


IMPORT_RULES = {"pallas_call": _pallas_call_rule}

# primitives with no rule, and the error that says what to write instead
UNSUPPORTED = {"mpmd_map": _core_mesh_error, "core_map": _core_mesh_error}


# ------------------------------------------------------------- autodiff
# JAX has no reverse-mode rule for pallas_call (``jax.grad`` fails while
# linearizing it), and its forward-mode rule re-traces the kernel outside
# the grid, where ``pl.program_id`` fails an assertion. Both happen while
# ``mtia_jax.jit`` traces the user's function; ``autodiff_error`` turns them
# into an error that says so.

_JAX_DIR = os.path.dirname(jax.__file__) + os.sep
_OUR_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                  for d in ("mtia_jax", "lowering", "runtime"))
_PALLAS_DIR = os.path.join(_JAX_DIR, "_src", "pallas") + os.sep


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _user_frame(frames) -> SourceLoc | None:
    stdlib = os.path.dirname(os.__file__) + os.sep
    for frame in reversed(frames):
        name = frame.filename
        if not (name.startswith((_JAX_DIR, stdlib, *_OUR_DIRS)) or "site-packages" in name
                or name.startswith("<")):
            return SourceLoc(name, frame.lineno, frame.name)
    return None


def autodiff_error(error: BaseException) -> UnsupportedOperationError | None:
    """A clear error for ``error``, raised while tracing a function that
    differentiates a ``pallas_call``; None for any other error."""
    chain = _chain(error)
    frames = [traceback.extract_tb(e.__traceback__) for e in chain]
    in_jvp_rule = any(f.name == "_pallas_call_jvp_rule" for tb in frames for f in tb)
    from_pallas = any(f.filename.startswith(_PALLAS_DIR) for tb in frames for f in tb)
    message = str(error)
    if in_jvp_rule:
        how = "forward-mode autodiff (jax.jvp, or jax.grad through it)"
        why = ("JAX's forward-mode rule for pallas_call cannot differentiate this kernel (it "
               "re-traces the body outside its grid, where pl.program_id fails)")
    elif (from_pallas and message.startswith("Linearization failed")) or (
            "pallas_call" in message and "Transpose rule" in message):
        how = "reverse-mode autodiff (jax.grad, jax.vjp)"
        why = "JAX has no reverse-mode rule for pallas_call"
    else:
        return None
    said = message.splitlines()[0] if message else "(no message)"
    return UnsupportedOperationError(
        f"{how} of a pallas_call", _user_frame(frames[0]),
        advice=(f"differentiate a jnp version of the function instead, or give the kernel its "
                f"own derivative with jax.custom_vjp (its bwd may be another pallas_call). "
                f"{why} (JAX said: {type(error).__name__}: {said})"))
