"""``mtia_jax.jit``: compile a JAX function for a modeled MTIA chip.

The stages mirror ``jax.stages``::

    f = mtia_jax.jit(fun, chip="mtia450")
    lowered = f.lower(*args)        # traced and imported: MTIA IR
    compiled = lowered.compile()    # passes, memory plan, cost model, host program
    compiled(*args)                 # the same results as jax.jit(fun)(*args)
    compiled.cost_analysis()        # FLOPs, bytes, modeled time, roofline, peak HBM

Calling ``f(*args)`` does all of this once per input signature (shapes,
dtypes, pytree structure, static arguments, chip) and caches the result.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import warnings
from typing import Any, Callable, Sequence

import jax
from jax import tree_util
from jax._src import api_util  # the debug info jax.jit gives tracing errors

from lowering import pallas
from lowering.from_jaxpr import import_closed_jaxpr
from lowering.ir import Module
from lowering.pipeline import PassContext, run_passes
from mtia_jax import chips as chip_catalogue
from mtia_jax import config, sharding
from mtia_jax import mesh as mesh_lib
from mtia_jax.errors import HBMCapacityError, UnmeasuredLoopWarning
from mtia_jax.profiler import Profile
from mtia_jax.precision import path_string
from mtia_jax.precision import resolve as resolve_precision
from runtime.cost_model import ProgramCost, program_cost
from runtime import trace
from runtime.device import device_for
from runtime.executor import EXECUTORS, EagerExecutor
from runtime.gc_pause import without_gc_pauses
from runtime.pallas_cost import check_block_sets
from runtime.memory import MemoryPlan, plan_memory

# ------------------------------------------------------------ arguments


@dataclasses.dataclass(frozen=True)
class _ArgSpec:
    """How a call's arguments split into traced leaves and static values."""

    in_tree: Any
    avals: tuple
    static: tuple

    @property
    def key(self):
        return (self.in_tree, self.avals, self.static)


def _aval_key(leaf) -> tuple:
    aval = getattr(leaf, "aval", None)  # jax arrays and tracers carry theirs
    if aval is None:
        aval = jax.typeof(leaf)  # NumPy arrays and Python scalars
    return (aval.shape, aval.dtype, aval.weak_type)


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return (x,) if isinstance(x, (int, str)) else tuple(x)


class _Signature:
    """Resolves static/donated argument positions and names like ``jax.jit``."""

    def __init__(self, fun: Callable, static_argnums, static_argnames, donate_argnums):
        try:
            self.params = list(inspect.signature(fun).parameters.values())
            known = True
        except (TypeError, ValueError):
            self.params, known = [], False
        positional = [p.name for p in self.params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if known:
            self._check(static_argnums, static_argnames, donate_argnums, positional)
        nums = {self._normalize(i, len(positional)) for i in _as_tuple(static_argnums)}
        names = set(_as_tuple(static_argnames))
        nums |= {positional.index(n) for n in names if n in positional}
        names |= {positional[i] for i in nums if 0 <= i < len(positional)}
        self.static_argnums = frozenset(nums)
        self.static_argnames = frozenset(names)
        self.has_statics = bool(nums or names)
        self.donate_argnums = frozenset(self._normalize(i, len(positional))
                                        for i in _as_tuple(donate_argnums))
        both = self.static_argnums & self.donate_argnums
        if both:
            raise ValueError(
                f"mtia_jax.jit: static_argnums and donate_argnums cannot intersect: argument(s) "
                f"{sorted(both)} ({', '.join(positional[i] for i in sorted(both) if i < len(positional))}) "
                f"appear in both. A static argument is a Python value, not a buffer to donate.")

    def _check(self, static_argnums, static_argnames, donate_argnums, positional) -> None:
        """The ``ValueError``s ``jax.jit`` raises for argument numbers and names
        the function does not have."""
        kinds = {p.kind for p in self.params}
        if inspect.Parameter.VAR_POSITIONAL not in kinds:
            for option, nums in (("static_argnums", static_argnums), ("donate_argnums", donate_argnums)):
                bad = tuple(i for i in _as_tuple(nums)
                            if not isinstance(i, int) or not -len(positional) <= i < len(positional))
                if bad:
                    raise ValueError(
                        f"mtia_jax.jit: jitted function has {option}={tuple(_as_tuple(nums))}, but "
                        f"only accepts {len(positional)} positional arguments "
                        f"({', '.join(positional) or 'none'}).")
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            names = {p.name for p in self.params if p.kind != inspect.Parameter.POSITIONAL_ONLY}
            bad_names = set(_as_tuple(static_argnames)) - names
            if bad_names:
                raise ValueError(
                    f"mtia_jax.jit: jitted function has invalid argnames {bad_names} in "
                    f"static_argnames. Function does not take these args (it takes: "
                    f"{', '.join(p.name for p in self.params) or 'none'}).")

    @staticmethod
    def _normalize(i: int, n: int) -> int:
        return i + n if i < 0 and n else i

    def split(self, args: Sequence, kwargs: dict):
        """(dynamic args, dynamic kwargs, static tuple)"""
        dyn_args = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        static = (tuple((i, a) for i, a in enumerate(args) if i in self.static_argnums)
                  + tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames)))
        try:
            hash(static)
        except TypeError as e:
            raise TypeError(
                f"mtia_jax.jit: static arguments must be hashable, got {static!r}. "
                f"Pass arrays as non-static arguments, or convert lists to tuples.") from e
        return dyn_args, dyn_kwargs, static

    @staticmethod
    def merge(dyn_args: tuple, dyn_kwargs: dict, static: tuple):
        pos_static = {k: v for k, v in static if isinstance(k, int)}
        kw_static = {k: v for k, v in static if isinstance(k, str)}
        args, dyn = [], iter(dyn_args)
        for i in range(len(dyn_args) + len(pos_static)):
            args.append(pos_static[i] if i in pos_static else next(dyn))
        return args, {**dyn_kwargs, **kw_static}

    def donated_leaves(self, args: Sequence) -> frozenset[int]:
        """Flat leaf indices (of the dynamic arguments) of donated positional arguments."""
        leaves, offset = set(), 0
        for pos, arg in enumerate(args):
            if pos in self.static_argnums:
                continue
            n = len(tree_util.tree_leaves(arg))
            if pos in self.donate_argnums:
                leaves.update(range(offset, offset + n))
            offset += n
        return frozenset(leaves)


# ---------------------------------------------------------------- stages


class Lowered:
    """A traced program imported into MTIA IR, not yet compiled."""

    def __init__(self, module: Module, chip, in_tree, out_tree, donated: frozenset[int], mode: str,
                 precision=None, mesh=None, in_specs=None, out_specs=None, numerics: str = "vmap",
                 scale_out_axes: tuple[str, ...] = (), param_names: tuple | None = None):
        self.module = module
        # per flat input: the names precision rules match (PrecisionPolicy.rules)
        self.param_names = param_names
        self.scale_out_axes = scale_out_axes
        self.chip = chip
        self.in_tree = in_tree
        self.out_tree = out_tree
        self.donated = donated
        self.mode = mode
        self.precision = precision
        self.mesh, self.in_specs, self.out_specs, self.numerics = mesh, in_specs, out_specs, numerics

    def as_text(self) -> str:
        """The MTIA IR as imported from the jaxpr, with user source lines."""
        return self.module.as_text()

    def optimize(self) -> tuple[Module, MemoryPlan]:
        """Run the pass pipeline and plan HBM; no numerics, nothing allocated."""
        ctx = PassContext(chip=self.chip, precision=self.precision, mesh=self.mesh,
                          scale_out_axes=self.scale_out_axes,
                          in_specs=self.in_specs, out_specs=self.out_specs, donated=self.donated,
                          param_names=self.param_names)
        module = run_passes(self.module, ctx)
        check_block_sets(module, self.chip)  # Pallas kernels' blocks fit on chip
        return module, plan_memory(module, self.donated)

    @without_gc_pauses
    def compile(self) -> "Compiled":
        module, memory = self.optimize()
        if memory.peak_bytes > self.chip.hbm_bytes:
            raise HBMCapacityError(
                self.chip.name, memory.peak_bytes, self.chip.hbm_bytes,
                [(b.what, b.nbytes, b.source) for b in memory.live_at_peak(5)])
        if module.layout is not None and self.mode != "graph":
            raise ValueError("mtia_jax.jit: sharded programs run in mode='graph' (eager mode runs one "
                             "device's kernels); drop mode='eager' or the shardings")
        extra = {"numerics": self.numerics} if module.layout is not None else {}
        executor = EXECUTORS[self.mode](module, donate_argnums=sorted(self.donated), **extra)
        return Compiled(module, self.chip, memory, executor, self.in_tree, self.out_tree, self.mode)


class Compiled:
    """A compiled program: callable on the host, with a modeled cost.

    Every call adds the program's modeled cost to ``self.device.stats`` and,
    inside ``mtia_jax.profiler.trace``, records its kernels. Calls made while
    tracing under a JAX transformation (``jax.jit``, ``grad``, ``vmap`` of the
    compiled function) are not device executions and are not recorded.
    """

    _TRACER = jax.core.Tracer

    def __init__(self, module: Module, chip, memory: MemoryPlan, executor, in_tree, out_tree,
                 mode: str = "graph"):
        self.module = module
        self.chip = chip
        self.memory = memory
        self.mode = mode  # how kernels are launched: runtime.cost_model.LAUNCH_MODELS
        self._static_cost = program_cost(module, chip, mode=mode)
        self._costs: dict[tuple, ProgramCost] = {}  # trip counts -> cost
        self._trip_counts = None  # while-loop trip counts of the last call (device arrays)
        self._warned_unmeasured = False
        self._executor = executor
        self.in_tree = in_tree
        self.out_tree = out_tree
        # what a call needs, looked up once: the call path stays as cheap as jax.jit's
        self.device = device_for(chip)
        self._stats = self.device.stats
        self._record = self._stats.record
        self._static_totals = self._call_totals(self._static_cost)
        self._single_output = tree_util.treedef_is_leaf(out_tree) and out_tree.num_leaves == 1
        self._trace = trace
        self._options = config._values
        self._checks_outputs = not isinstance(executor, EagerExecutor)  # eager checks per kernel

    def __call__(self, *args, **kwargs):
        """Call with the non-static arguments, as for ``jax.stages.Compiled``."""
        leaves, in_tree = tree_util.tree_flatten((args, kwargs))
        if in_tree != self.in_tree:
            raise TypeError(f"mtia_jax: compiled for arguments with structure {self.in_tree}, "
                            f"called with {in_tree}. Call the jitted function instead to recompile.")
        return self.call_flat(leaves)

    def call_flat(self, leaves: Sequence):
        outs, trip_counts = self._executor(*leaves)
        if outs and isinstance(outs[0], self._TRACER):
            return tree_util.tree_unflatten(self.out_tree, outs)  # traced, not executed
        if trip_counts:
            if not self._record_deferred(trip_counts):
                return tree_util.tree_unflatten(self.out_tree, outs)  # traced, not executed
        else:
            if self._trace.ACTIVE:
                self._trace.record_call(self.device, self.module.name, self._cost_for, None)
            self._record(self._static_totals)
        options = self._options
        if (options["debug_nans"] or options["debug_infs"]) and self._checks_outputs:
            self._check_outputs(leaves, outs)
        return outs[0] if self._single_output else tree_util.tree_unflatten(self.out_tree, outs)

    def _record_deferred(self, trip_counts) -> bool:
        """Record a call of a program with while loops: its cost depends on the
        trip counts, which are folded in when the stats are read. False if the
        counts are tracers (a traced call, not an execution)."""
        if any(isinstance(n, self._TRACER) for n in trip_counts.values()):
            return False
        self._trip_counts = trip_counts
        if self._trace.ACTIVE:
            self._trace.record_call(self.device, self.module.name, self._cost_for, trip_counts)
        self._stats.record_deferred(self._totals_for, trip_counts)
        return True

    def _check_outputs(self, leaves: Sequence, outs: Sequence) -> None:
        """Graph mode with debug_nans/debug_infs: if an output holds a NaN/Inf,
        re-run the call kernel by kernel, which raises naming the kernel."""

        checks = EagerExecutor.enabled_checks()
        for index, out in enumerate(outs):
            found = EagerExecutor.find_nonfinite(out, checks)
            if found is not None:
                break
        else:
            return
        donated_gone = any(getattr(x, "is_deleted", lambda: False)() for x in leaves)
        if not donated_gone:
            EagerExecutor(self.module)(*leaves)
        option = "debug_nans" if found == "NaN" else "debug_infs"
        why = ("its donated inputs are gone, so the call cannot be re-run kernel by kernel"
               if donated_gone else "re-running it kernel by kernel did not reproduce it")
        raise FloatingPointError(
            f"mtia_jax {option}: output {index} of '{self.module.name}' holds {found}; {why}. "
            f"Call the function with mtia_jax.jit(..., mode=\"eager\") (without donation) "
            f"to find the kernel.")

    @staticmethod
    def _call_totals(cost: ProgramCost) -> tuple[float, float, float]:
        return (cost.time_s, cost.total("hbm_bytes"), cost.total("flops"))

    def _cost_for(self, trip_counts) -> ProgramCost:
        """The cost of a call whose while loops ran ``trip_counts`` times
        (None or empty: no while loops)."""
        if not trip_counts:
            return self._static_cost
        counts = {path: float(n) for path, n in trip_counts.items()}
        key = tuple(sorted(counts.items()))
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= 256:
                self._costs.clear()
            cost = self._costs[key] = program_cost(self.module, self.chip, counts, mode=self.mode)
        return cost

    def _totals_for(self, trip_counts) -> tuple[float, float, float]:
        return self._call_totals(self._cost_for(trip_counts))

    @property
    def cost(self) -> ProgramCost:
        """The modeled cost; while loops use the trip counts of the last call."""
        return self._cost_for(self._trip_counts)

    def as_text(self) -> str:
        """The final MTIA IR after all passes."""
        return self.module.as_text()

    def cost_analysis(self) -> dict[str, float]:
        """Counts and modeled times for the whole program on ``self.chip``.

        ``time_s`` and ``roofline_time_s`` are *modeled* on the chip, not
        measured. ``efficiency`` = roofline / modeled time (1.0 is ideal).
        """
        cost = self.cost
        time = cost.time_s
        if cost.assumed_loops and not self._warned_unmeasured:
            self._warned_unmeasured = True
            warnings.warn(f"mtia_jax: {len(cost.assumed_loops)} while loop(s) with a data-dependent "
                          f"trip count have not run yet and are modeled at 1 trip per execution: "
                          f"{', '.join(cost.assumed_loops)}. Call the compiled function once to "
                          f"measure them.", UnmeasuredLoopWarning, stacklevel=2)
        return {
            "flops": cost.total("flops"),
            "transcendentals": cost.total("transcendentals"),
            "bytes accessed": cost.total("bytes_accessed"),
            "hbm_bytes": cost.total("hbm_bytes"),
            "time_s": time,
            "roofline_time_s": cost.roofline_time_s,
            "efficiency": cost.roofline_time_s / time if time > 0 else 1.0,
            "peak_hbm_bytes": float(self.memory.peak_bytes),
            "kernels": float(len(cost.kernels)),
            "collective_bytes": cost.total("collective_bytes"),
            "collective_time_s": float(sum(k.time_s for k in cost.kernels if k.stream == "network")),
            # while loops whose trip count depends on data and is assumed (1 per
            # execution) because the program has not run yet (listed in profile())
            "unmeasured_loops": float(len(cost.assumed_loops)),
        }

    def memory_analysis(self) -> MemoryPlan:
        """HBM use, with the names of jax's ``CompiledMemoryStats``:
        ``argument_size_in_bytes``, ``output_size_in_bytes``,
        ``temp_size_in_bytes``, ``alias_size_in_bytes`` (donated arguments),
        ``peak_memory_in_bytes``; and ``largest(n)``, the biggest buffers."""
        return self.memory

    def profile(self):
        """The modeled per-kernel profile (``mtia_jax.profiler.Profile``):
        ``.rows`` sorted by modeled time; ``str()`` is an aligned table.
        While loops use the trip counts of the last call."""
        return Profile.from_cost(self.cost)

    def kernel_table(self) -> str:
        """The profile as a table: ``str(self.profile())``."""
        return str(self.profile())


# ---------------------------------------------------------------- jit


class JitFunction:
    """The callable returned by :func:`jit`."""

    def __init__(self, fun: Callable, *, chip, static_argnums, static_argnames,
                 donate_argnums, mode: str, precision=None, in_shardings=None, out_shardings=None,
                 mesh=None, numerics: str = "vmap"):
        if mode not in EXECUTORS:
            raise ValueError(f"mtia_jax.jit: unknown mode {mode!r}; choose one of {sorted(EXECUTORS)}")
        if chip is not None:
            chip_catalogue.get(chip)  # fail early on unknown chip names
        self._fun = fun
        self._chip = None if chip is None else chip_catalogue.get(chip)
        self._mode = mode
        self._precision = precision
        resolve_precision(precision)  # validates early
        if numerics not in ("vmap", "spmd"):
            raise ValueError(f"mtia_jax.jit: numerics={numerics!r}; choose 'vmap' (logical devices on "
                             f"one host device) or 'spmd' (shard_map over real JAX devices)")
        self._in_shardings, self._out_shardings = in_shardings, out_shardings
        self._mesh = sharding.find_mesh(mesh, in_shardings, out_shardings)
        self._numerics = numerics
        self._signature = _Signature(fun, static_argnums, static_argnames, donate_argnums)
        self._cache: dict[Any, Compiled] = {}
        functools.update_wrapper(self, fun)

    def _resolve_chip(self):
        # without an explicit chip, follow $MTIA_JAX_CHIP at call time
        return self._chip if self._chip is not None else chip_catalogue.default()

    def _resolve_precision(self):
        # without an explicit policy, follow the enclosing precision_policy block
        return resolve_precision(self._precision)

    def _spec(self, args, kwargs):
        if self._signature.has_statics:
            dyn_args, dyn_kwargs, static = self._signature.split(args, kwargs)
        else:
            dyn_args, dyn_kwargs, static = args, kwargs, ()
        leaves, in_tree = tree_util.tree_flatten((dyn_args, dyn_kwargs))
        avals = tuple(_aval_key(x) for x in leaves)
        if any(d < 0 for shape, _, _ in avals for d in shape):
            self._negative_dims(args, kwargs)
        spec = _ArgSpec(in_tree, avals, static)
        return spec, leaves

    def _negative_dims(self, args, kwargs) -> None:
        """Raise a ``ValueError`` naming the argument with a negative dimension."""
        names = [p.name for p in self._signature.params]
        named = [(names[i] if i < len(names) else f"#{i}", a) for i, a in enumerate(args)
                 if i not in self._signature.static_argnums]
        named += [(k, v) for k, v in kwargs.items() if k not in self._signature.static_argnames]
        for name, arg in named:
            for path, leaf in tree_util.tree_flatten_with_path(arg)[0]:
                shape = tuple(_aval_key(leaf)[0])
                if any(d < 0 for d in shape):
                    raise ValueError(
                        f"mtia_jax: argument '{name}'{tree_util.keystr(path)} has shape {shape}, "
                        f"with a negative dimension; every dimension must be >= 0.")

    def lower(self, *args, **kwargs) -> Lowered:
        spec, _ = self._spec(args, kwargs)
        return self._lower(spec, self._signature.donated_leaves(args))

    @without_gc_pauses
    def _lower(self, spec: _ArgSpec, donated: frozenset[int]) -> Lowered:
        out_tree_box = []

        def flat_fun(*leaves):
            dyn_args, dyn_kwargs = tree_util.tree_unflatten(spec.in_tree, leaves)
            call_args, call_kwargs = _Signature.merge(dyn_args, dyn_kwargs, spec.static)
            out = self._fun(*call_args, **call_kwargs)
            out_leaves, out_tree = tree_util.tree_flatten(out)
            out_tree_box.append(out_tree)
            return out_leaves

        structs = [jax.ShapeDtypeStruct(shape, dtype, weak_type=weak)
                   for shape, dtype, weak in spec.avals]
        # tracing errors name the user's function, its line and its parameters,
        # as jax.jit's do, not this wrapper
        dyn_args, dyn_kwargs = tree_util.tree_unflatten(spec.in_tree, structs)
        call_args, call_kwargs = _Signature.merge(dyn_args, dyn_kwargs, spec.static)
        api_util.save_wrapped_fun_debug_info(flat_fun, api_util.debug_info(
            "mtia_jax.jit", self._fun, call_args, call_kwargs,
            static_argnums=tuple(self._signature.static_argnums),
            static_argnames=tuple(self._signature.static_argnames)))
        try:
            closed = jax.make_jaxpr(flat_fun)(*structs)
        except Exception as error:
            clear = pallas.autodiff_error(error)  # differentiating a Pallas kernel
            if clear is not None:
                raise clear from error
            raise
        fun = self._fun
        while isinstance(fun, functools.partial):
            fun = fun.func
        name = getattr(fun, "__name__", "main")
        module = import_closed_jaxpr(closed, name=name if name.isidentifier() else "main")
        mesh, in_specs, out_specs = self._specs(spec, structs, closed, out_tree_box[0])
        param_names = self._param_names(spec, structs)
        self._check_rules_match(param_names, name)
        return Lowered(module, self._resolve_chip(), spec.in_tree, out_tree_box[0], donated, self._mode,
                       self._resolve_precision(), mesh, in_specs, out_specs, self._numerics,
                       mesh_lib.scale_out_axes(self._mesh) if self._mesh is not None else (),
                       param_names)

    def _check_rules_match(self, param_names, name: str) -> None:
        """A rule of a policy passed to this program (``precision=``) that
        matches none of its arguments is a typo, not a choice: a clear error.
        (A policy of an enclosing ``precision_policy`` block is shared by
        unrelated programs, so its rules need not match each.)"""
        if self._precision is None:
            return
        names = [n for names in param_names for n in names]
        for pattern, fmt in self._precision.rules:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"mtia_jax.jit({name}): the precision rule ({pattern!r}, {fmt!r}) matches no "
                    f"argument; the arguments' paths are {sorted({ns[-1] for ns in param_names})}")

    def _param_names(self, spec: _ArgSpec, structs) -> tuple[tuple[str, ...], ...]:
        """Per flat input, the names precision rules match: ``(arg/path, path)``
        for a leaf of a pytree argument, ``(arg,)`` for an array argument,
        where ``arg`` is the function's parameter name (the position for
        extra positional arguments, the keyword for keyword arguments)."""
        positional = [p.name for p in self._signature.params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        static_positions = {k for k, _ in spec.static if isinstance(k, int)}
        dyn_args, dyn_kwargs = tree_util.tree_unflatten(spec.in_tree, structs)
        positions = [i for i in range(len(dyn_args) + len(static_positions)) if i not in static_positions]
        names = []
        for keypath, _ in tree_util.tree_flatten_with_path((dyn_args, dyn_kwargs))[0]:
            where, key, inner = keypath[0], keypath[1], path_string(keypath[2:])
            if where.idx == 0:
                i = positions[key.idx]
                arg = positional[i] if i < len(positional) else str(i)
            else:
                arg = str(key.key)
            names.append((f"{arg}/{inner}", inner) if inner else (arg,))
        return tuple(names)

    def _specs(self, spec: _ArgSpec, structs, closed, out_tree):
        """(mesh sizes, spec per flat input, spec per flat output) for partitioning."""
        if self._mesh is None:
            return None, None, None
        sizes = sharding.mesh_sizes(self._mesh)
        dyn_args, _ = tree_util.tree_unflatten(spec.in_tree, structs)
        arg_paths = tree_util.tree_flatten_with_path(dyn_args)[0]
        in_specs = sharding.flat_specs(self._in_shardings, tuple(dyn_args), arg_paths, sizes, "argument")
        in_specs += [None] * (len(structs) - len(in_specs))  # keyword arguments: replicated
        in_specs = [s if s is not None else (None,) * len(x.shape) for s, x in zip(in_specs, structs)]
        outs = tree_util.tree_unflatten(out_tree, [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                                                   for v in closed.jaxpr.outvars])
        out_paths = tree_util.tree_flatten_with_path(outs)[0]
        out_specs = sharding.flat_specs(self._out_shardings, outs, out_paths, sizes, "output")
        return sizes, in_specs, out_specs

    def __call__(self, *args, **kwargs):
        spec, leaves = self._spec(args, kwargs)
        chip = self._resolve_chip()
        key = (spec.key, chip, self._resolve_precision())
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._lower(spec, self._signature.donated_leaves(args)).compile()
            self._cache[key] = compiled
        return compiled.call_flat(leaves)

    def clear_cache(self) -> None:
        self._cache.clear()


def jit(fun: Callable | None = None, *, chip=None, static_argnums=(), static_argnames=(),
        donate_argnums=(), mode: str = "graph", precision=None, in_shardings=None,
        out_shardings=None, mesh=None, numerics: str = "vmap"):
    """Compile ``fun`` for a modeled MTIA chip; results equal ``jax.jit(fun)``.

    Args:
      fun: the function to compile (pytrees of arrays in and out). Omit it to
        get a decorator: ``@mtia_jax.jit(chip="mtia400")``.
      chip: a chip name from ``mtia_jax.chips.names()`` or a ``ChipSpec``;
        default ``$MTIA_JAX_CHIP`` or ``"mtia450"``.
      static_argnums, static_argnames, donate_argnums: as for ``jax.jit``.
      mode: ``"graph"`` (one host XLA program, the default) or ``"eager"``
        (one host dispatch per kernel, for debugging).
      precision: a ``mtia_jax.PrecisionPolicy`` for the program's matmuls;
        default: the enclosing ``mtia_jax.precision_policy`` block, if any.
      in_shardings, out_shardings: ``NamedSharding``s (or ``PartitionSpec``s with
        ``mesh=``), a pytree prefix of the arguments / outputs, as for
        ``jax.jit``. The program is partitioned over the mesh: the modeled cost
        is one device's, with its collectives.
      mesh: a ``mtia_jax.make_mesh`` mesh, for ``PartitionSpec`` shardings.
      numerics: for sharded programs, ``"vmap"`` (the logical devices run as a
        ``jax.vmap`` on one host device, the default) or ``"spmd"``
        (``shard_map`` over as many real JAX devices).
    """
    options = dict(chip=chip, static_argnums=static_argnums, static_argnames=static_argnames,
                   donate_argnums=donate_argnums, mode=mode, precision=precision,
                   in_shardings=in_shardings, out_shardings=out_shardings, mesh=mesh, numerics=numerics)
    if fun is None:
        return functools.partial(jit, **options)
    return JitFunction(fun, **options)
