"""Per-group precision: how much quantizing one parameter group at a time
costs a loss (``sensitivity``), and the per-group formats that minimise
modeled latency under a loss budget (``search``), both measured through the
compiler (``mtia_jax.jit`` with ``PrecisionPolicy(rules=...)``) so that
exactly its MX numerics apply.

    found = mtia_jax.sensitivity(loss, params, data, ("mx4", "mx8"))
    print(found.table())
    result = mtia_jax.search(loss, params, data, budget=0.01, chip="mtia450",
                             cost_fn=decode, cost_args=large_shapes)
    print(result.table()); result.policy
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import numpy as np

import mtia_jax  # its lazy attribute loads mtia_jax.estimate, whose name the function keeps

from lowering.passes import precision as precision_pass
from lowering.pipeline import PASSES, PassContext, run_passes
from mtia_jax import api, mx
from mtia_jax.precision import PrecisionPolicy, resolve


def _short(fmt: str | None) -> str:
    """``mx4`` for ``mxfp4_e2m1`` (the shortest alias), the name otherwise."""
    if fmt is None:
        return "unchanged"
    aliases = [a for a, name in mx.ALIASES.items() if name == fmt]
    return min(aliases, key=len) if aliases else fmt


def _width(fmt: str | None) -> float:
    return float("inf") if fmt is None else mx.get_format(fmt).element_bits


def _escape(path: str) -> str:
    """A glob matching exactly ``path``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _canonical_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    names = []
    for fmt in formats:
        if fmt is None:
            raise ValueError("formats: None is the unquantized starting point, not a format to try; "
                             "list MX formats such as ('mx4', 'mx6', 'mx8')")
        name = mx.get_format(fmt).name
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("formats: give at least one MX format, e.g. ('mx4', 'mx6', 'mx8')")
    return tuple(names)


def _with_rules(base: PrecisionPolicy, rules) -> PrecisionPolicy:
    """``base`` with ``rules`` ahead of its own."""
    return dataclasses.replace(base, rules=tuple(rules) + base.rules)


def _param_groups(fn, params, data, chip, groups) -> tuple[str, ...]:
    """The groups to measure: ``groups`` checked against the paths of
    ``params``, or by default one per parameter of ``params`` that the
    compiler uses as a matmul weight (in the order of ``params``' leaves)."""
    lowered = api.jit(fn, chip=chip, precision=PrecisionPolicy()).lower(params, data)
    names = lowered.param_names[:len(jax.tree_util.tree_leaves(params))]
    if groups is not None:
        if isinstance(groups, str):
            groups = (groups,)
        groups = tuple(groups)
        PrecisionPolicy(rules=tuple((g, None) for g in groups))  # checks the patterns
        paths = [leaf[-1] for leaf in names]
        for g in groups:
            if not any(fnmatch.fnmatchcase(name, g) for leaf in names for name in leaf):
                raise ValueError(f"group {g!r} matches no parameter of params; its paths are: "
                                 f"{', '.join(paths)}")
        if len(set(groups)) != len(groups):
            raise ValueError(f"groups: {groups} repeats a pattern")
        return groups
    ctx = PassContext(chip=lowered.chip, param_names=lowered.param_names)
    module = run_passes(lowered.module, ctx, PASSES[:PASSES.index(precision_pass)])
    weights = precision_pass.weight_names(module, ctx)
    found = tuple(dict.fromkeys(_escape(leaf[-1]) for leaf in names if leaf in weights))
    if not found:
        raise ValueError("sensitivity: no leaf of params is the weight operand of a matmul in fn "
                         "(nothing a precision policy's weight formats change); pass groups=")
    return found


def _loss(fn, params, data, policy, chip, metric) -> float:

    out = api.jit(fn, chip=chip, precision=policy)(params, data)
    value = metric(out) if metric is not None else out
    value = np.asarray(value)
    if value.shape != () or value.dtype.kind not in "fiub" and "float" not in value.dtype.name:
        raise ValueError(f"fn(params, data) must return a scalar loss (or pass metric= to make one "
                         f"of its output), got {'shape ' + str(value.shape) if value.shape else value.dtype}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What ``sensitivity`` measured.

    Attributes:
      base_loss: the loss under ``base`` (no group quantized).
      deltas: ``{(group, format): loss increase}``, formats by canonical name
        (``"mxfp4_e2m1"``); ``delta(group, "mx4")`` takes aliases.
      groups, formats: the groups (patterns) and formats, in order.
      base: the policy everything else ran under.
      losses: ``{(group, format): loss}``, the losses measured.
    """
    base_loss: float
    deltas: dict
    groups: tuple[str, ...]
    formats: tuple[str, ...]
    base: PrecisionPolicy
    losses: dict = dataclasses.field(default_factory=dict)

    def delta(self, group: str, fmt) -> float:
        return self.deltas[(group, mx.get_format(fmt).name)]

    def ranking(self, fmt=None) -> list[str]:
        """Groups, most sensitive first, at ``fmt`` (default: the narrowest format)."""
        fmt = min(self.formats, key=_width) if fmt is None else mx.get_format(fmt).name
        return sorted(self.groups, key=lambda g: -self.deltas[(g, fmt)])

    def table(self) -> str:
        """Loss increase per group (rows) and format (columns)."""
        head = ["group", *(_short(f) for f in self.formats)]
        rows = [[g, *(f"{self.deltas[(g, f)]:+.3e}" for f in self.formats)] for g in self.groups]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([f"loss increase over {self.base_loss:.6g} (base policy: {self.base})",
                          line(head), *map(line, rows)])

    __str__ = table


def sensitivity(fn, params, data, formats=("mx4", "mx6", "mx8"), *, groups=None, metric=None,
                base: PrecisionPolicy | None = None, chip=None) -> Sensitivity:
    """The increase of the loss ``fn(params, data)`` when one parameter group
    at a time has its matmul weights in each MX format.

    Each ``(group, format)`` runs ``mtia_jax.jit(fn, precision=policy)``
    with ``policy = base`` plus the rule ``(group, format)`` (so exactly the
    compiler's MX numerics apply: one compile per pair) on the host, and
    subtracts the loss under ``base`` alone.

    Args:
      fn: ``fn(params, data)`` -> a scalar loss (lower is better), e.g. the
        mean next-token cross-entropy; or any output, with ``metric``.
      params: the parameter pytree (fn's first argument); rule patterns
        match its ``/``-joined key paths (see ``PrecisionPolicy.rules``).
      data: fn's second argument (a pytree of arrays).
      formats: the MX formats to try.
      groups: rule patterns, one group each (e.g. ``("layers/w_*",
        "lm_head")``); default: one group per leaf of ``params`` that the
        compiler uses as a matmul's weight operand (a stacked ``layers/wq``
        scanned over is one group: all its layers; the embedding, read by a
        gather, and norm scales are not groups).
      metric: ``metric(fn(params, data))`` -> the scalar loss, when fn
        returns something else (negate scores where higher is better).
      base: the policy every run uses otherwise (e.g. ``activations="mx8"``);
        default none.
      chip: the chip to compile for (numerics do not depend on it).
    """
    base = PrecisionPolicy() if base is None else resolve(base)
    fmts = _canonical_formats(formats)
    groups = _param_groups(fn, params, data, chip, groups)
    base_loss = _loss(fn, params, data, base, chip, metric)
    losses = {(g, f): _loss(fn, params, data, _with_rules(base, ((g, f),)), chip, metric)
              for g in groups for f in fmts}
    deltas = {key: loss - base_loss for key, loss in losses.items()}
    return Sensitivity(base_loss, deltas, groups, fmts, base, losses)


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One (group, format) step ``search`` tried.

    ``saved_s`` is the modeled time the step saves alone (the group's format
    changed from ``previous`` with every other group unquantized);
    ``sensitivity`` the increase of the group's own measured loss increase;
    ``loss`` the measured loss of the combined policy with the step (None
    when the step was ruled out without a run); ``time_s`` the modeled time
    of the combined policy (None unless accepted); ``validation_loss`` its
    loss on ``validation_data`` (None without it, or when not run)."""
    group: str
    format: str
    previous: str | None
    saved_s: float
    sensitivity: float
    loss: float | None
    accepted: bool
    reason: str
    time_s: float | None = None
    validation_loss: float | None = None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What ``search`` found: ``policy`` (the per-group rules), its measured
    ``loss`` and the ``base_loss`` with no group quantized, the ``budget``,
    the modeled time of ``cost_fn`` before (no group quantized) and after,
    every step tried in order, and the sensitivities it ranked them by;
    with ``validation_data``, the policy's loss there and the base loss there."""
    policy: PrecisionPolicy
    loss: float
    base_loss: float
    budget: float
    time_before_s: float
    time_after_s: float
    steps: tuple[SearchStep, ...]
    sensitivity: Sensitivity
    validation_loss: float | None = None
    validation_base_loss: float | None = None

    @property
    def formats(self) -> dict[str, str | None]:
        """Each group's chosen format (None: unquantized)."""
        chosen = {g: None for g in self.sensitivity.groups}
        for step in self.steps:
            if step.accepted:
                chosen[step.group] = step.format
        return chosen

    def table(self) -> str:
        lines = [f"policy: {self.policy}",
                 f"loss {self.loss:.6g} (base {self.base_loss:.6g}, increase "
                 f"{self.loss - self.base_loss:+.3e}, budget {self.budget:.3e}); modeled time "
                 f"{self.time_before_s * 1e6:.2f} us -> {self.time_after_s * 1e6:.2f} us"]
        if self.validation_loss is not None:
            lines.append(f"validation loss {self.validation_loss:.6g} (base {self.validation_base_loss:.6g}, "
                         f"increase {self.validation_loss - self.validation_base_loss:+.3e})")
        lines.append("steps (in the order tried):")
        for s in self.steps:
            loss = f"loss {s.loss:.6g}" if s.loss is not None else "not run"
            verdict = "taken" if s.accepted else "refused"
            lines.append(f"  {s.group}: {_short(s.previous)} -> {_short(s.format)}  saves "
                         f"{s.saved_s * 1e6:.3f} us, sensitivity {s.sensitivity:+.3e}, {loss}: "
                         f"{verdict} ({s.reason})")
        return "\n".join(lines)

    __str__ = table


def search(fn, params, data, *, budget: float, chip, formats=("mx4", "mx6", "mx8"), cost_fn=None,
           cost_args=None, cost_kwargs=None, groups=None, metric=None,
           base: PrecisionPolicy | None = None, sensitivities: Sensitivity | None = None,
           validation_data=None) -> SearchResult:
    """Per-group weight formats that minimise the modeled latency of
    ``cost_fn`` on ``chip`` while the loss ``fn(params, data)`` rises by at
    most ``budget``: a greedy search.

    What it does, exactly:

    1. Groups: ``groups`` or, by default, one per parameter of ``params``
       used as a matmul weight (as ``sensitivity``). The start is ``base``
       (default: no policy) with every group unquantized.
    2. Sensitivity: the loss increase of each (group, format) alone
       (``sensitivity(..., base=start)``; or ``sensitivities``, if given,
       measured with the same groups, formats and base).
    3. Savings: the modeled time (``mtia_jax.estimate(cost_fn, *cost_args,
       chip=chip, precision=..., **cost_kwargs).time_s``) of the start, and
       of the start with one group in one format; a group's saving is the
       difference. Savings are measured per group alone and assumed to add
       up (one estimate per (group, format), not one per candidate and
       round); the modeled time of the policy taken is estimated after each
       step, and reported.
    4. Greedy: a candidate step moves a group to a narrower format
       (fewer element bits) than it has. The one taken next is the one with
       the most time saved per unit of sensitivity added (saving difference
       / sensitivity difference of the two formats; steps that add no
       sensitivity first, by saving). Steps that save no modeled time are
       never taken; a step whose own sensitivity already exceeds
       ``budget`` is refused without a run. Otherwise the loss of the
       policy with the step is measured (``mtia_jax.jit(fn, precision=...)``
       on ``params, data``; a policy with one group quantized was measured
       by step 2): the step is taken if the increase over the
       start's loss is at most ``budget``, else refused, and a refused
       format rules out the narrower ones for that group too. It stops
       when no candidate is left.

    The budget holds on ``data``; with ``validation_data`` a step is taken
    only if the loss there (``fn(params, validation_data)``) also rises by
    at most ``budget`` over the start's, which guards against a policy fitted
    to the noise of one sample. Measure the result on data neither saw to
    check that it generalises.

    Args:
      fn, params, data, metric, groups: as for ``sensitivity``.
      budget: the largest loss increase allowed (>= 0), in the loss's units.
      chip: the chip the latency is modeled on.
      formats: the MX formats to choose from.
      cost_fn, cost_args, cost_kwargs: the program whose modeled time is
        minimised, ``mtia_jax.estimate(cost_fn, *cost_args, **cost_kwargs)``; default
        ``fn`` on ``(params, data)``. Its parameters must have the paths the
        groups match (e.g. the decode step of a large model of the same
        architecture, on shapes: accuracy is measured on the small model,
        speed on the large one).
      base: the policy other operands follow (e.g. ``activations="mx8"``);
        its own rules come after the searched groups'.
      sensitivities: a ``sensitivity`` result to reuse.
      validation_data: optional second data every step must also stay
        within the budget on (one more run per step measured).

    Returns a ``SearchResult``: ``.policy``, ``.loss``, ``.time_before_s``,
    ``.time_after_s``, ``.steps``, ``.table()``.
    """

    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"search: budget must be a finite number >= 0 (a loss increase), got {budget!r}")
    base = PrecisionPolicy() if base is None else resolve(base)
    fmts = _canonical_formats(formats)
    groups = _param_groups(fn, params, data, chip, groups)
    start = _with_rules(base, ((g, None) for g in groups)) if base.weights is not None else base

    def policy_of(state: dict) -> PrecisionPolicy:
        rules = tuple((g, f) for g, f in state.items() if f is not None or base.weights is not None)
        return _with_rules(base, rules)

    if sensitivities is None:
        sensitivities = sensitivity(fn, params, data, fmts, groups=groups, metric=metric, base=start,
                                    chip=chip)
    elif (set(sensitivities.groups) != set(groups) or not set(fmts) <= set(sensitivities.formats)
          or sensitivities.base != start):
        raise ValueError("search: sensitivities= was measured with other groups, formats or base "
                         "policy than this search")
    cost_fn = fn if cost_fn is None else cost_fn
    cost_args = (params, data) if cost_args is None else tuple(cost_args)
    cost_kwargs = dict(cost_kwargs or {})
    modeled = lambda policy: mtia_jax.estimate(cost_fn, *cost_args, chip=chip, precision=policy,
                                      **cost_kwargs).time_s
    time_before = modeled(start)
    saved = {(g, None): 0.0 for g in groups}
    saved |= {(g, f): time_before - modeled(_with_rules(start, ((g, f),))) for g in groups for f in fmts}
    sens = {(g, None): 0.0 for g in groups} | dict(sensitivities.deltas)

    base_loss = sensitivities.base_loss
    # losses already measured, by policy (a policy with one group quantized is a sensitivity run)
    measured = {_with_rules(start, ((g, f),)): loss for (g, f), loss in sensitivities.losses.items()}
    check = None if validation_data is None else {start: _loss(fn, params, validation_data, start, chip, metric)}
    state = {g: None for g in groups}
    loss, time_now = base_loss, time_before
    validation_loss = None if check is None else check[start]
    ruled_out: set = set()
    steps = []
    while True:
        candidates = []
        for g in groups:
            for f in fmts:
                if _width(f) >= _width(state[g]) or (g, f) in ruled_out:
                    continue
                gain, cost = saved[(g, f)] - saved[(g, state[g])], sens[(g, f)] - sens[(g, state[g])]
                if gain > 0:
                    candidates.append((g, f, gain, cost))
        if not candidates:
            break
        g, f, gain, cost = min(candidates, key=lambda c: (0, -c[2]) if c[3] <= 0 else (1, -c[2] / c[3]))
        narrower = {(g, n) for n in fmts if _width(n) <= _width(f)}
        if sens[(g, f)] > budget:
            ruled_out |= narrower
            steps.append(SearchStep(g, f, state[g], gain, cost, None, False,
                                    f"its own loss increase {sens[(g, f)]:.3e} exceeds the budget"))
            continue
        trial = policy_of({**state, g: f})
        trial_loss = measured.get(trial)
        if trial_loss is None:
            trial_loss = measured[trial] = _loss(fn, params, data, trial, chip, metric)
        trial_check = None
        if trial_loss - base_loss <= budget and check is not None:
            trial_check = check.get(trial)
            if trial_check is None:
                trial_check = check[trial] = _loss(fn, params, validation_data, trial, chip, metric)
        if trial_loss - base_loss > budget:
            ruled_out |= narrower
            steps.append(SearchStep(g, f, state[g], gain, cost, trial_loss, False,
                                    f"loss increase {trial_loss - base_loss:.3e} exceeds the budget"))
        elif trial_check is not None and trial_check - check[start] > budget:
            ruled_out |= narrower
            steps.append(SearchStep(g, f, state[g], gain, cost, trial_loss, False,
                                    f"validation loss increase {trial_check - check[start]:.3e} exceeds "
                                    f"the budget", validation_loss=trial_check))
        else:
            time_now = modeled(trial)
            steps.append(SearchStep(g, f, state[g], gain, cost, trial_loss, True,
                                    "within the budget", time_now, trial_check))
            state[g], loss, validation_loss = f, trial_loss, trial_check
    return SearchResult(policy_of(state), loss, base_loss, float(budget), time_before, time_now,
                        tuple(steps), sensitivities, validation_loss,
                        None if check is None else check[start])

