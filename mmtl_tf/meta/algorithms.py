"""Meta-learning algorithms as configurations of one engine.

MAML, first-order MAML, Meta-SGD, MAML++, ANIL and Reptile differ only in a few switches of
the same inner loop and train step; ``MetaConfig`` holds the switches and ``resolve`` fills them
from the algorithm's name. ``pretrain`` is the baseline they are measured against (the MAML
paper's "pretrained" model): no inner loop in training, adapted like MAML at evaluation.
"""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("maml", "fomaml", "metasgd", "mamlpp", "anil", "reptile")
# Trained without an inner loop: plain regression of the starting weights on every point of
# every task (support and query pooled), then fine-tuned at evaluation exactly as MAML adapts
# (eval_inner_steps SGD steps at inner_lr). The same budget as a meta-training run of the same
# config: meta_batch_size tasks of shots + queries points per step, for train.steps steps.
BASELINES = ("pretrain",)
LEARNED_LR = ("none", "per_element", "per_layer_per_step")
HEAD_INITS = ("learned", "zero", "proto")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Meta-learning switches.

    Attributes:
      algorithm: one of ALGORITHMS, or a baseline of BASELINES; ``resolve`` sets the switches
        that define it.
      inner_steps: SGD steps on the support set during meta-training.
      eval_inner_steps: steps at evaluation and adaptation time (often more than in training; 0
        predicts with the initial head, e.g. the prototype head, without a gradient step).
      inner_lr: inner SGD learning rate (the initial value when it is learned).
      first_order: drop second-order terms of the meta-gradient (FOMAML).
      learned_inner_lr: "none", "per_element" (Meta-SGD: one rate per parameter element) or
        "per_layer_per_step" (MAML++: one rate per parameter tensor and inner step).
      multi_step_loss: MAML++'s query loss after every inner step, weights annealed to the last
        step over ``multi_step_anneal`` meta-steps.
      first_order_until: MAML++'s derivative-order annealing: first order for this many
        meta-steps, then second order.
      head_init: "learned", "zero" or "proto" (see InnerLoop); "zero"/"proto" are way-agnostic.
      max_ways: size of the meta-learned head; tasks may have any N in 2..max_ways.
      transductive: batch-norm statistics of the query batch itself (MAML) or of the support set.
      adapt_head_only: ANIL, the inner loop updates the head only.
      reptile: the outer update moves the initialisation toward the adapted weights.
      weight_decay: lambda of the L2 regulariser R(theta) = sum of squared meta-parameters
        (the initialisation theta; learned inner rates are not decayed); 0 is off.
      proximal: mu of iMAML's proximal inner-loop term: each inner step descends the support
        loss plus mu/2 * ||phi - phi_0||^2, phi_0 the fast weights the task started from, so
        adapted weights stay near the initialisation; 0 is off. Training, evaluation,
        ``MetaLearner.adapt`` and classifier exports (anchor_<param> graph inputs) use it.
      family_weighting: with task families (``DataConfig.families``): "fixed" (alpha_k) or
        "recent_loss" (alpha_k times the family's recent post-adaptation loss, renormalised;
        see ``task_weighting``), whose moving average keeps ``family_loss_momentum``.
      track_pre_adaptation: also report query loss/accuracy before adaptation (one extra forward).
      parallel_iterations: tasks of a meta-batch processed concurrently by ``tf.map_fn``.
    """

    algorithm: str = "maml"
    inner_steps: int = 2  # a zero head's first step moves only the head (see training_problem)
    eval_inner_steps: int = 3
    inner_lr: float = 0.4
    first_order: bool = False
    learned_inner_lr: str = "none"
    multi_step_loss: bool = False
    multi_step_anneal: int = 1000
    first_order_until: int = 0
    head_init: str = "zero"
    max_ways: int = 20
    transductive: bool = True
    adapt_head_only: bool = False
    reptile: bool = False
    weight_decay: float = 0.0
    proximal: float = 0.0
    family_weighting: str = "fixed"
    family_loss_momentum: float = 0.9
    track_pre_adaptation: bool = True
    parallel_iterations: int = 2

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS + BASELINES:
            raise ValueError(f"algorithm={self.algorithm!r} is unknown; choose one of "
                             f"{ALGORITHMS + BASELINES}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init={self.head_init!r} is unknown; choose one of {HEAD_INITS}")
        if self.learned_inner_lr not in LEARNED_LR:
            raise ValueError(f"learned_inner_lr={self.learned_inner_lr!r}; choose one of {LEARNED_LR}")
        if self.inner_steps < 1 or self.eval_inner_steps < 0:
            raise ValueError(f"inner_steps={self.inner_steps} must be >= 1 and eval_inner_steps="
                             f"{self.eval_inner_steps} >= 0")
        if self.eval_inner_steps == 0 and self.head_init == "zero":
            raise ValueError("eval_inner_steps=0 with head_init='zero' predicts every class alike "
                             "(the head never leaves zero); adapt at least one step or use "
                             "head_init='proto'")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr={self.inner_lr} must be positive")
        if self.max_ways < 2:
            raise ValueError(f"max_ways={self.max_ways} must be at least 2")
        if self.family_weighting not in ("fixed", "recent_loss"):
            raise ValueError(f"meta.family_weighting={self.family_weighting!r} is unknown; "
                             "choose 'fixed' or 'recent_loss'")
        if not 0 <= self.family_loss_momentum < 1:
            raise ValueError(f"meta.family_loss_momentum={self.family_loss_momentum} must be in "
                             "[0, 1)")
        for name in ("weight_decay", "proximal"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"meta.{name}={value!r} must be a finite number >= 0 (0 is off)")
        if self.algorithm == "pretrain":
            unused = [f"{name}={getattr(self, name)!r}" for name, off in PRETRAIN_UNUSED
                      if getattr(self, name) != off]
            if unused:
                raise ValueError(f"algorithm='pretrain' has no inner loop in training, so "
                                 f"{', '.join(unused)} would do nothing; drop them")

    @property
    def adapts_in_training(self) -> bool:
        """False for the pretrained baseline: its training never runs the inner loop."""
        return self.algorithm not in BASELINES


# Switches of the training inner loop, which the pretrained baseline does not have, and their
# off values.
PRETRAIN_UNUSED = (("first_order", False), ("learned_inner_lr", "none"),
                   ("multi_step_loss", False), ("first_order_until", 0), ("reptile", False))


def resolve(config: MetaConfig) -> MetaConfig:
    """The config with the switches that define ``config.algorithm`` turned on."""
    switches = {
        "maml": {},
        "fomaml": {"first_order": True},
        "metasgd": {"learned_inner_lr": "per_element"},
        "mamlpp": {"learned_inner_lr": "per_layer_per_step", "multi_step_loss": True},
        "anil": {"adapt_head_only": True},
        "reptile": {"reptile": True, "first_order": True},
        "pretrain": {},
    }[config.algorithm]
    return dataclasses.replace(config, **switches)


def training_problem(config: MetaConfig, head_init: str,
                     task: str = "classification") -> str | None:
    """Why meta-training ``config`` would not do what its name says, or None.

    ``head_init`` is the head the task starts from ("learned" for regression, whatever the
    config says). At a zero head the support loss does not depend on the encoder (its features
    meet a zero matrix), so the first inner step moves only the head: with one step, MAML and
    its relatives train exactly what ANIL trains, and Reptile (whose zero head has no meta-head
    to move) learns nothing at all. The pretrained baseline is defined for regression only:
    classification episodes relabel their classes 0..N-1 in every episode, so there is no fixed
    target to regress the starting weights to.
    """
    if config.algorithm == "pretrain" and task != "regression":
        return ("algorithm='pretrain' (plain regression of the starting weights, no inner loop) "
                "is a baseline for regression tasks only: classification episodes relabel their "
                "classes 0..N-1 in every episode, so its head would learn nothing; use it with "
                "the sinusoid family (preset sinusoid-pretrained)")
    config = resolve(config)
    if head_init != "zero" or config.inner_steps > 1 or config.adapt_head_only:
        return None
    if config.reptile:
        return ("algorithm='reptile' with head_init='zero' and inner_steps=1 learns nothing: the "
                "encoder's inner gradient is zero at a zero head and a zero head has no meta-head "
                "to move; use inner_steps>=2 or head_init='learned'")
    return (f"algorithm={config.algorithm!r} with head_init='zero' and inner_steps=1 never adapts "
            "the encoder in training (its inner gradient is zero at a zero head), so it trains "
            "what ANIL trains; use inner_steps>=2, head_init='proto' or 'learned', or say "
            "algorithm='anil'")


def rate_step(step: int, learned_steps: int) -> int:
    """Which learned per-step rate (MAML++) inner step ``step`` uses: its own, or the last
    learned one for steps beyond training's (evaluation and devices may adapt for longer)."""
    return min(step, learned_steps - 1)


def inner_rate_schedule(config: MetaConfig, learned, count: int, ways, shared_head: bool):
    """``step -> per-parameter inner rates`` in the task layout (head rates sliced to N).

    ``learned``: the learned rate variables (none; one per parameter element, Meta-SGD; or one
    per tensor and step, MAML++). ``shared_head``: a zero or prototype head has no fixed column
    order, so its columns share the mean of the learned head rates.
    """
    import tensorflow as tf  # the configuration above stays importable without TensorFlow

    kind = config.learned_inner_lr
    if kind == "none":
        constant = [tf.constant(config.inner_lr)] * count
        return lambda step: constant
    if kind == "per_element":
        rates = [tf.convert_to_tensor(v) for v in learned[:-2]]
        if shared_head:
            head = [tf.reduce_mean(learned[-2], axis=1, keepdims=True), tf.reduce_mean(learned[-1])]
        else:
            head = [learned[-2][:, :ways], learned[-1][:ways]]
        return lambda step: rates + head
    return lambda step: [v[rate_step(step, config.inner_steps)] for v in learned]


def multi_step_weights(steps: int, iteration, anneal: int):
    """MAML++ multi-step loss weights (steps,) at meta-step ``iteration``: uniform at first,
    moving over ``anneal`` meta-steps to 0.03 / steps on each early step, the rest on the last."""
    import tensorflow as tf

    if steps == 1:
        return tf.ones([1])
    progress = tf.minimum(tf.cast(iteration, tf.float32) / float(max(anneal, 1)), 1.0)
    early = (1.0 - progress) / steps + progress * 0.03 / steps
    return tf.concat([tf.fill([steps - 1], early), [1.0 - (steps - 1) * early]], 0)
