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
      proximal: mu of iMAML's proximal term: each step descends the support loss plus
        mu/2 * ||phi - phi_0||^2 over the adapted parameters, phi_0 the task's starting fast
        weights (a function of theta, differentiated through). 0 is off.
    """

    encoder: typing.Any
    task: str = "classification"
    head_init: str = "learned"
    transductive: bool = True
    adapt_mask: tuple[bool, ...] | None = None
    proximal: float = 0.0

    def features(self, encoder_params, x, bn_state=None, sample_mask=None):
        """Encoder features (B, F) and the batch-norm state the batch produced.

        With ``bn_state`` None the batch is normalised by its own statistics (training mode);
        otherwise by the statistics in ``bn_state`` (inference mode). ``sample_mask`` (B,) marks
        the real rows of a padded batch (the encoder must accept it, as Conv4 does).
        """
        check_input_shape(self.encoder, x)
        state = bn_state if bn_state is not None else [v.value for v in self.encoder.non_trainable_variables]
        kwargs = {} if sample_mask is None else {"sample_mask": sample_mask}
        features, new_state = self.encoder.stateless_call(
            list(encoder_params), list(state), x, training=bn_state is None, **kwargs)
        return features, new_state

    def logits(self, params, x, bn_state=None, sample_mask=None, class_mask=None):
        """Task outputs (B, N) for inputs x at fast weights ``params``.

        ``class_mask`` (N,) switches classes off (their logits become -1e9): an N-wide head
        then behaves exactly like the head sliced to its active classes.
        """
        features, _ = self.features(params[:-2], x, bn_state, sample_mask)
        outputs = self.head_outputs(params, features)
        if class_mask is not None:
            outputs = tf.where(class_mask > 0, outputs, tf.constant(-1e9, outputs.dtype))
        return outputs

    @staticmethod
    def head_outputs(params, features):
        """The linear head (params[-2], params[-1]) applied to encoder features (B, F)."""
        # Under mixed precision the encoder computes in (b)float16; the head and loss stay float32.
        return tf.matmul(tf.cast(features, params[-2].dtype), params[-2]) + params[-1]

    def loss(self, outputs, targets, sample_mask=None):
        """Mean loss of one task; classification labels are int (B,), regression targets (B, 1).

        Cross-entropy is written by hand rather than as TensorFlow's fused sparse op, whose
        backprop output does not convert to ONNX. The label's log-probability is gathered, not
        picked by a one-hot product: a masked class's log-probability is -inf in a runtime whose
        LogSoftmax is log(softmax(x)) (onnx's reference evaluator), and 0 * -inf is NaN (a
        Where would not do: tf2onnx turns a float Select into that product). Value and gradient
        equal those of -sum(onehot * log_softmax). With ``sample_mask`` (B,) the mean runs over
        the real rows only.
        """
        if self.task == "regression":
            per_example = tf.reduce_mean(tf.square(outputs - targets), axis=-1)
        else:
            rows = tf.range(tf.shape(targets)[0], dtype=targets.dtype)
            label_at = tf.stack([rows, targets], axis=1)  # (B, 2): row, label
            per_example = -tf.gather_nd(tf.nn.log_softmax(outputs), label_at)
        if sample_mask is None:
            return tf.reduce_mean(per_example)
        weights = tf.cast(sample_mask, per_example.dtype)
        return tf.reduce_sum(weights * per_example) / tf.reduce_sum(weights)

    def task_params(self, meta_params, support_x, support_y, ways, sample_mask=None):
        """The fast weights a task starts from: encoder params and an N-way head (F, N), (N,)."""
        encoder_params, head_w, head_b = list(meta_params[:-2]), meta_params[-2], meta_params[-1]
        if self.head_init == "learned":
            return encoder_params + [head_w[:, :ways], head_b[:ways]]
        if self.head_init == "zero":
            return encoder_params + [tf.zeros_like(head_w[:, :ways]), tf.zeros_like(head_b[:ways])]
        if self.head_init == "proto":
            features, _ = self.features(encoder_params, support_x, sample_mask=sample_mask)
            features = tf.cast(features, head_w.dtype)
            members = tf.one_hot(support_y, ways, dtype=features.dtype)  # (S, N)
            if sample_mask is not None:
                members *= tf.cast(sample_mask, features.dtype)[:, None]
            counts = tf.maximum(tf.reduce_sum(members, axis=0), 1.0)  # an absent class stays 0
            prototypes = tf.matmul(members, features, transpose_a=True) / counts[:, None]  # (N, F)
            # Squared-distance classifier as a linear layer: -|f - p|^2 = 2 p.f - |p|^2 - |f|^2.
            return encoder_params + [2.0 * tf.transpose(prototypes),
                                     -tf.reduce_sum(tf.square(prototypes), axis=-1)]
        raise ValueError(f"head_init={self.head_init!r} is not one of 'learned', 'zero', 'proto'")

    def step(self, params, support_x, support_y, learning_rates, first_order: bool,
             sample_mask=None, class_mask=None, anchor=None):
        """One SGD step on the support loss. Returns (support loss before the step, new params).

        ``learning_rates`` holds one tensor per parameter (a scalar, or the parameter's shape
        for Meta-SGD); masked-out parameters pass through unchanged. ``anchor``: phi_0 of the
        proximal term (``proximal`` > 0), in the layout of ``params``; the returned loss is the
        support loss alone.
        """
        mask = self.adapt_mask or (True,) * len(params)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            outputs = self.logits(params, support_x, sample_mask=sample_mask, class_mask=class_mask)
            support_loss = self.loss(outputs, support_y, sample_mask)
            objective = support_loss
            if self.proximal and anchor is not None:
                objective += 0.5 * self.proximal * tf.add_n([
                    tf.reduce_sum(tf.square(p - a)) for p, a, m in zip(params, anchor, mask) if m])
        adapted = [p for p, m in zip(params, mask) if m]
        grads = iter(tape.gradient(objective, adapted, unconnected_gradients="zero"))
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
    start: list  # the fast weights the task started from (``InnerLoop.task_params``)


def adapt(loop: InnerLoop, meta_params, support_x, support_y, ways, steps: int,
          learning_rates, first_order=False, query_x=None, sample_mask=None,
          class_mask=None, query_mask=None) -> Adapted:
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
      sample_mask: (S,) marks the real rows of a padded support set; class_mask: (N,) the
        active classes of a head wider than the task. The exported graphs use both, and so do
        meta-batches mixing task families (``mmtl_tf.data.families``).
      query_mask: (Q,) the real rows of a padded query set (transductive batch statistics).
    """
    start = loop.task_params(meta_params, support_x, support_y, ways, sample_mask)
    params, support_losses, query_outputs = start, [], []
    for step in range(steps):
        loss, params = loop.step(params, support_x, support_y, learning_rates(step), first_order,
                                 sample_mask, class_mask, anchor=start)
        support_losses.append(loss)
        if query_x is not None:
            query_outputs.append(query_logits(loop, params, support_x, query_x, sample_mask,
                                              query_mask, class_mask))
    final = loop.logits(params, support_x, sample_mask=sample_mask, class_mask=class_mask)
    support_losses.append(loop.loss(final, support_y, sample_mask))
    return Adapted(params, tf.stack(support_losses), query_outputs, start)


def check_input_shape(encoder, x) -> None:
    """Raises ValueError when inputs (B, ...) do not have the shape the encoder was built for.

    ``stateless_call`` skips Keras' input checks, so a wrong image size would otherwise fail
    deep inside the encoder or, when the feature size happens to agree, not fail at all.
    """
    expected = (encoder.get_build_config() or {}).get("input_shape")
    if expected is None and getattr(encoder, "inputs", None):  # a functional model
        expected = encoder.inputs[0].shape
    if expected is None:
        return
    expected, got = tuple(expected[1:]), tuple(x.shape[1:])
    if len(got) != len(expected) or any(
            e is not None and g is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} do not fit the encoder {encoder.name!r}, built for "
            f"(batch, {', '.join(map(str, expected))}): give examples of that shape (check the "
            "preprocessing's image size) or build the encoder for these inputs")


def query_logits(loop: InnerLoop, params, support_x, query_x, support_mask=None,
                 query_mask=None, class_mask=None):
    """Query outputs at fast weights, with the batch-norm semantics of ``loop``. The masks
    mark the real rows and classes of a padded task (see ``adapt``)."""
    if loop.transductive:
        return loop.logits(params, query_x, sample_mask=query_mask, class_mask=class_mask)
    _, support_state = loop.features(params[:-2], support_x, sample_mask=support_mask)
    return loop.logits(params, query_x, bn_state=support_state, class_mask=class_mask)
