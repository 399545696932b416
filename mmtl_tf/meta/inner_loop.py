"""THE inner loop: adapting fast weights to one task's support set.

Training, evaluation, the Keras model's ``adapt()`` and the exported adaptation graphs all call
``adapt`` below; there is no other copy. Fast weights are plain tensors: the encoder runs through
``keras.Model.stateless_call`` and nothing is assigned to a variable, so the outer tape sees the
whole inner loop (second order unless ``first_order``).

Parameter layout used everywhere: ``[*encoder_params, head_w (F, N), head_b (N,)]`` where the
encoder params follow ``encoder.trainable_variables`` and the head is the task's N-way slice.
"""

from __future__ import annotations

import dataclasses
import typing

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How a task is adapted.

    Attributes:
      encoder: the Keras feature encoder (B, ...) -> (B, F).
      task: "classification" (cross-entropy, labels 0..N-1) or "regression" (mean squared error).
      head_init: "learned" (meta-learned head sliced to N), "zero" (the head starts at zero for
        every task) or "proto" (Proto-MAML: rows from support-set prototypes). "zero" and "proto"
        make the model way-agnostic.
      transductive: True normalises the query with its own batch statistics (MAML's default);
        False normalises it with the support set's statistics, so each query's prediction is
        independent of the other queries.
      adapt_mask: per parameter (encoder params then head_w, head_b), whether the inner loop
        updates it; ANIL adapts the head only. None adapts everything.
    """

    encoder: typing.Any
    task: str = "classification"
    head_init: str = "learned"
    transductive: bool = True
    adapt_mask: tuple[bool, ...] | None = None

    def features(self, encoder_params, x, bn_state=None):
        """Encoder features (B, F) and the batch-norm state the batch produced.

        With ``bn_state`` None the batch is normalised by its own statistics (training mode);
        otherwise by the statistics in ``bn_state`` (inference mode).
        """
        state = bn_state if bn_state is not None else [v.value for v in self.encoder.non_trainable_variables]
        features, new_state = self.encoder.stateless_call(
            list(encoder_params), list(state), x, training=bn_state is None)
        return features, new_state

    def logits(self, params, x, bn_state=None):
        """Task outputs (B, N) for inputs x at fast weights ``params``."""
        features, _ = self.features(params[:-2], x, bn_state)
        return tf.matmul(features, params[-2]) + params[-1]

    def loss(self, outputs, targets):
        """Mean loss of one task; classification labels are int (B,), regression targets (B, 1).

        Cross-entropy is written as -sum(onehot * log_softmax) rather than TensorFlow's fused
        sparse op, whose backprop output does not convert to ONNX.
        """
        if self.task == "regression":
            return tf.reduce_mean(tf.square(outputs - targets))
        onehot = tf.one_hot(targets, tf.shape(outputs)[-1], dtype=outputs.dtype)
        return -tf.reduce_mean(tf.reduce_sum(onehot * tf.nn.log_softmax(outputs), axis=-1))

    def task_params(self, meta_params, support_x, support_y, ways):
        """The fast weights a task starts from: encoder params and an N-way head (F, N), (N,)."""
        encoder_params, head_w, head_b = list(meta_params[:-2]), meta_params[-2], meta_params[-1]
        if self.head_init == "learned":
            return encoder_params + [head_w[:, :ways], head_b[:ways]]
        if self.head_init == "zero":
            return encoder_params + [tf.zeros_like(head_w[:, :ways]), tf.zeros_like(head_b[:ways])]
        if self.head_init == "proto":
            features, _ = self.features(encoder_params, support_x)
            prototypes = tf.math.unsorted_segment_mean(features, support_y, ways)  # (N, F)
            # Squared-distance classifier as a linear layer: -|f - p|^2 = 2 p.f - |p|^2 - |f|^2.
            return encoder_params + [2.0 * tf.transpose(prototypes),
                                     -tf.reduce_sum(tf.square(prototypes), axis=-1)]
        raise ValueError(f"head_init={self.head_init!r} is not one of 'learned', 'zero', 'proto'")

    def step(self, params, support_x, support_y, learning_rates, first_order: bool):
        """One SGD step on the support loss. Returns (support loss before the step, new params).

        ``learning_rates`` holds one tensor per parameter (a scalar, or the parameter's shape
        for Meta-SGD); masked-out parameters pass through unchanged.
        """
        mask = self.adapt_mask or (True,) * len(params)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            support_loss = self.loss(self.logits(params, support_x), support_y)
        adapted = [p for p, m in zip(params, mask) if m]
        grads = iter(tape.gradient(support_loss, adapted, unconnected_gradients="zero"))
        new_params = []
        for p, m, lr in zip(params, mask, learning_rates):
            if not m:
                new_params.append(p)
                continue
            g = next(grads)
            if isinstance(first_order, bool):
                g = tf.stop_gradient(g) if first_order else g
            else:  # a boolean tensor: derivative-order annealing switches it during training
                g = tf.where(first_order, tf.stop_gradient(g), g)
            new_params.append(p - tf.cast(lr, p.dtype) * g)
        return support_loss, new_params


class Adapted(typing.NamedTuple):
    """What ``adapt`` returns; losses are stacked over steps (steps + 1 entries: before any step,
    then after each step, the last one computed at the final weights)."""

    params: list
    support_losses: tf.Tensor
    query_outputs: list  # query outputs after each step (empty if no query was given)


def adapt(loop: InnerLoop, meta_params, support_x, support_y, ways, steps: int,
          learning_rates, first_order=False, query_x=None) -> Adapted:
    """Adapts to one task with ``steps`` SGD steps on the support set.

    Args:
      loop: the InnerLoop (encoder, loss, head initialisation, batch-norm mode).
      meta_params: ``[*encoder_params, head_w (F, max_ways), head_b (max_ways,)]``.
      support_x: (N*K, ...) inputs; support_y: (N*K,) int labels 0..N-1 (or (K, 1) targets).
      ways: N, a Python int or scalar tensor (1 for regression).
      steps: number of inner SGD steps (a Python int: the loop is unrolled, steps are few).
      learning_rates: callable ``step -> list of per-parameter learning rates`` in the
        task-parameter layout (head rates already sliced to N).
      first_order: drop second-order terms (tensor or bool; a tensor allows annealing).
      query_x: if given, query outputs are computed after every step (multi-step loss).
    """
    params = loop.task_params(meta_params, support_x, support_y, ways)
    support_losses, query_outputs = [], []
    for step in range(steps):
        loss, params = loop.step(params, support_x, support_y, learning_rates(step), first_order)
        support_losses.append(loss)
        if query_x is not None:
            query_outputs.append(query_logits(loop, params, support_x, query_x))
    support_losses.append(loop.loss(loop.logits(params, support_x), support_y))
    return Adapted(params, tf.stack(support_losses), query_outputs)


def query_logits(loop: InnerLoop, params, support_x, query_x):
    """Query outputs at fast weights, with the batch-norm semantics of ``loop``."""
    if loop.transductive:
        return loop.logits(params, query_x)
    _, support_state = loop.features(params[:-2], support_x)
    return loop.logits(params, query_x, bn_state=support_state)
