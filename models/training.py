"""The training loop the example models share (``models.tiny_llm``,
``models.ctr_data``): optimizer steps, the mean loss between reports,
held-out metrics every ``eval_every`` steps and at the end, and a tqdm bar.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def run(step: Callable, params, opt_state, batch: Callable, *, steps: int,
        evaluate: Callable | None = None, metrics: tuple[str, ...] = (), eval_every: int = 0,
        progress: bool = False, postfix_every: int = 10, postfix: Callable | None = None):
    """``steps`` calls of ``step(params, opt_state, *batch(i)) -> (params,
    opt_state, loss)`` for i = 1..steps.

    ``evaluate(params) -> dict`` of the ``metrics`` runs every ``eval_every``
    steps (0: never but at the end) and after the last step. Returns
    ``(params, history)``: one ``{"step", "loss", *metrics}`` entry per
    evaluation and at the end (loss: the mean of the steps since the last
    entry; a metric is None where it was not measured). ``progress`` shows a
    tqdm bar whose postfix, ``postfix(mean loss, last metrics or None) ->
    dict``, is refreshed every ``postfix_every`` steps and at each entry."""
    history, losses, last = [], [], None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, unit="step", dynamic_ncols=True)
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, *batch(i))
        losses.append(loss)
        measure = evaluate is not None and ((eval_every and i % eval_every == 0) or i == steps)
        if measure or (bar is not None and i % postfix_every == 0) or i == steps:
            mean_loss = float(np.mean([float(v) for v in losses]))
            measured = evaluate(params) if measure else None
            last = measured if measured is not None else last
            if measure or i == steps:
                history.append({"step": i, "loss": mean_loss, **(measured or dict.fromkeys(metrics))})
                losses = []
            if bar is not None and postfix is not None:
                bar.set_postfix(postfix(mean_loss, last))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return params, history
