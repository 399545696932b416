"""The exported computations as TensorFlow functions with explicit, named parameters.

Every graph takes the parameters as inputs (in ``param_names`` order) instead of reading
variables, so one graph serves the meta-initialisation and every personalised state. All of them
call the one inner loop (``mmtl_tf.meta.inner_loop``): ``adapt_step`` is ``InnerLoop.step`` on a
support set padded to ``max_support = max_ways * max_shots`` rows with a sample mask, and a head
``max_ways`` wide with a class mask, so a single static-shape graph serves every N-way K-shot
task up to the maximum.

Proximal models (``InnerLoop.proximal`` mu > 0, iMAML's term): the adaptation graphs also take
the task's starting parameters as ``anchor_<param>`` (the head's only, for ``head_step``) and
``InnerLoop.step`` descends the support loss plus mu/2 * ||params - anchor||^2; without the term
they take no anchors.

Batch norm: in non-transductive mode (the shipped models) a query is normalised with the support
set's statistics, which ``support_stats`` computes at given parameters; ``predict`` then takes
them as inputs. In transductive mode ``predict`` normalises a batch with its own statistics and
takes no statistics.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """Static sizes of the exported graphs."""

    image_size: int
    channels: int
    max_ways: int
    max_shots: int
    transductive: bool
    learned_inner_lr: str  # "none", "per_element" or "per_layer_per_step"
    support_rows: int | None = None  # a smaller support bucket; None: max_ways * max_shots

    @property
    def max_support(self) -> int:
        """Rows of the padded support set the adaptation graphs take."""
        return self.support_rows or self.max_ways * self.max_shots


def _clean(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", path).strip("_")


def param_names(learner) -> list[str]:
    """Input names of the parameters: encoder variables by path, then head_w, head_b."""
    return [_clean(v.path) for v in learner.encoder.trainable_variables] + ["head_w", "head_b"]


def bn_names(learner) -> list[str]:
    """Input names of the batch-norm statistics (the encoder's non-trainable variables)."""
    return ["bn_" + _clean(v.path) for v in learner.encoder.non_trainable_variables]


class Exportable:
    """The exported functions of one MetaLearner, with static shapes from an ExportSpec."""

    def __init__(self, learner, spec: ExportSpec):
        if learner.task != "classification":
            raise ValueError("only classification learners are exported for devices")
        self.learner, self.spec = learner, spec
        self.loop = learner.loop
        self.params = [tf.convert_to_tensor(p) for p in learner.meta_params]
        self.bn_state = [tf.convert_to_tensor(v) for v in learner.encoder.non_trainable_variables]
        self.names, self.bn = param_names(learner), bn_names(learner)
        self.proximal = float(self.loop.proximal)  # mu; > 0 adds the anchor inputs

    # ----- input signatures -------------------------------------------------------------------
    def image_spec(self, rows, name):
        s = self.spec
        return tf.TensorSpec([rows, s.image_size, s.image_size, s.channels], tf.float32, name)

    def param_specs(self):
        return [tf.TensorSpec(p.shape, p.dtype, n) for p, n in zip(self.params, self.names)]

    def bn_specs(self):
        return [tf.TensorSpec(v.shape, v.dtype, n) for v, n in zip(self.bn_state, self.bn)]

    def lr_specs(self):
        """One learning-rate input per parameter: a scalar, or the parameter's shape (Meta-SGD)."""
        if self.spec.learned_inner_lr == "per_element":
            return [tf.TensorSpec(p.shape, tf.float32, "lr_" + n) for p, n in zip(self.params, self.names)]
        return [tf.TensorSpec([], tf.float32, "lr_" + n) for n in self.names]

    def anchor_specs(self, head_only: bool = False):
        """The proximal term's anchors, ``anchor_<param>`` (the head's only with ``head_only``);
        none when the model has no proximal term."""
        if not self.proximal:
            return []
        pairs = list(zip(self.params, self.names))[-2 if head_only else 0:]
        return [tf.TensorSpec(p.shape, p.dtype, "anchor_" + n) for p, n in pairs]

    def initial_lrs(self, step: int = 0):
        """The learning rates of inner step ``step`` as the inner loop uses them
        (``MetaLearner.learning_rates``, the one rule), each broadcast to the shape its input
        takes (``lr_specs``): a zero or prototype head's shared Meta-SGD rate fills every column."""
        rates = self.learner.learning_rates(self.spec.max_ways)(step)
        if self.spec.learned_inner_lr == "per_element":
            return [tf.broadcast_to(tf.cast(r, tf.float32), p.shape) for r, p in zip(rates, self.params)]
        return [tf.cast(r, tf.float32) for r in rates]

    def stored_lrs(self):
        """The rates to ship: per parameter, the rate (scalar or per element), or for MAML++
        a vector of one rate per inner step (steps beyond it use the last)."""
        if self.spec.learned_inner_lr == "per_layer_per_step":
            return [tf.convert_to_tensor(v) for v in self.learner.inner_lrs]
        return self.initial_lrs()

    # ----- the computations ---------------------------------------------------------------------
    def predict(self, images, params, bn_state=None):
        """Logits (B, max_ways) at ``params``; bn_state None means batch statistics."""
        return self.loop.logits(list(params), images, bn_state=None if bn_state is None else list(bn_state))

    def support_stats(self, support_x, sample_mask, params, with_logits: bool = False):
        """Batch-norm statistics of the real support rows at ``params``; ``with_logits`` adds
        the support set's logits (rows, max_ways) under those statistics, from the same pass."""
        features, state = self.loop.features(list(params)[:-2], support_x, sample_mask=sample_mask)
        if with_logits:
            return [*state, self.loop.head_outputs(list(params), features)]
        return list(state)

    def adapt_step(self, support_x, support_y, sample_mask, class_mask, params, lrs,
                   anchor=()):
        """One inner SGD step: (support loss before the step, updated params). ``anchor``: the
        task's starting params (``anchor_specs``), used by a proximal model only."""
        return self.loop.step(list(params), support_x, support_y, list(lrs), True,
                              sample_mask, class_mask, anchor=list(anchor) or None)

    def head_step(self, support_x, support_y, sample_mask, class_mask, params, lrs,
                  head_anchor=()):
        """One inner step that updates only head_w, head_b (ANIL-style, for small devices).
        ``head_anchor``: the starting (head_w, head_b) of a proximal model's term."""
        head_only = dataclasses.replace(
            self.loop, adapt_mask=(False,) * (len(self.params) - 2) + (True, True))
        # The encoder's anchors are never read: the term covers the adapted parameters only.
        anchor = [*list(params)[:-2], *head_anchor] if len(head_anchor) else None
        loss, new = head_only.step(list(params), support_x, support_y, list(lrs), True,
                                   sample_mask, class_mask, anchor=anchor)
        return loss, new[-2:]

    def head_then_adapt_step(self, support_x, support_y, sample_mask, class_mask, params, lrs,
                             next_lrs, anchor=()):
        """``head_step`` then ``adapt_step`` (rates ``next_lrs``) in one graph: a zero head's
        first step (see the device runtime) and the step after it run the encoder forward on
        the same encoder parameters, and the converted graph computes it once (canonicalise
        merges identical nodes). Returns (loss, (head_w, head_b) after the first step, loss
        after it, params after both). ``anchor`` as in ``adapt_step``."""
        anchor = list(anchor)
        loss, head = self.head_step(support_x, support_y, sample_mask, class_mask, params, lrs,
                                    anchor[-2:])
        middle = [*list(params)[:-2], *head]
        next_loss, new = self.adapt_step(support_x, support_y, sample_mask, class_mask, middle,
                                         next_lrs, anchor)
        return loss, head, next_loss, new

    def init_head(self, support_x, support_y, sample_mask, params):
        """The head a task starts from (max_ways wide): the meta-learned one, zeros, or
        prototypes of the support set (by head_init). Returns (head_w, head_b)."""
        start = self.loop.task_params(list(params), support_x, support_y, self.spec.max_ways, sample_mask)
        return start[-2:]
