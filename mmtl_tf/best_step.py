"""Which step's weights an adaptation hands back, and the status that says so.

numpy only: the device runtime (``mmtl_tf.ondevice``) and TensorFlow's ``MetaLearner.adapt``
both follow this rule. An inner learning rate that suits most tasks can overshoot on some (the
shipped 5-way model's rate on a 20-way task: support losses 3.00, 0.62, 0.32, 2.07), and the
last step's weights then classify worse than an earlier step's. So an adaptation keeps the
weights of the step with the lowest support loss and says in its status when that is not the
last one.
"""

from __future__ import annotations

import numpy as np


class AdaptationWarning(RuntimeWarning):
    """Adaptation kept an earlier step's weights than the last: the support loss rose, or it
    became non-finite and adaptation stopped."""


def kept_step(support_losses, keep_best: bool = True) -> int:
    """The step whose weights to keep, from the support losses after 0, 1, ... steps; a
    non-finite loss ends the usable ones (adaptation stops there). -1 if the first is not finite.

    ``keep_best``: the step with the lowest loss (the latest of equal ones), else the last
    usable step (the fixed-step protocol of meta-training's evaluation).
    """
    losses = np.asarray(support_losses, np.float64)
    finite = np.isfinite(losses)
    usable = len(losses) if finite.all() else int(np.argmin(finite))
    if usable == 0:
        return -1
    if not keep_best:
        return usable - 1
    return usable - 1 - int(np.argmin(losses[:usable][::-1]))


def status(support_losses, kept: int) -> str:
    """"ok" when the last step's weights are kept; otherwise one sentence starting with
    "stopped:" (the last loss is non-finite) or "kept_best_step:" (the loss rose), naming the
    kept step and the losses."""
    losses = [float(v) for v in support_losses]
    last, shown = len(losses) - 1, ", ".join(f"{v:.4g}" for v in losses)
    if not np.isfinite(losses[-1]):
        return (f"stopped: the support loss became non-finite ({losses[-1]}) after step {last}; "
                f"kept the parameters after step {kept} (support losses {shown}); use a smaller "
                "lr or fewer steps")
    if kept < last:
        return (f"kept_best_step: the support loss rose after step {kept} (support losses "
                f"{shown}); kept the parameters after step {kept}, whose loss "
                f"{losses[kept]:.4g} is the lowest; use a smaller lr or fewer steps")
    return "ok"
