"""The SavedModel: serving_default, adapt and adapt_and_predict signatures.

All three run the one inner loop through ``Exportable`` (signatures.py). The support set has any
size; its N is read from the labels (0..N-1) and the head stays ``max_ways`` wide with the other
classes masked, exactly as in the ONNX adaptation graph; a proximal model's steps are anchored
at the parameters the task starts from (after ``init_head``), as ``inner_loop.adapt`` anchors them.
"""

from __future__ import annotations

import tensorflow as tf

from mmtl_tf.export.signatures import Exportable


class AdaptationModule(tf.Module):
    """A tf.Module holding the meta-learned parameters and the exported functions."""

    def __init__(self, exportable: Exportable, default_steps: int):
        super().__init__()
        self._ex = exportable
        # Tracked so that the variables the inner loop reads (batch-norm state) are saved.
        self.encoder = exportable.learner.encoder
        self.default_steps = default_steps
        self.params = [tf.Variable(p, trainable=False, name=n)
                       for p, n in zip(exportable.params, exportable.names)]
        self.bn_state = [tf.Variable(v, trainable=False, name=n)
                         for v, n in zip(exportable.bn_state, exportable.bn)]
        self.lrs = [tf.Variable(lr, trainable=False, name="lr_" + n)
                    for lr, n in zip(exportable.stored_lrs(), exportable.names)]
        self.per_step = exportable.spec.learned_inner_lr == "per_layer_per_step"
        image = exportable.image_spec(None, "images")
        support = exportable.image_spec(None, "support_images")
        labels = tf.TensorSpec([None], tf.int32, "support_labels")
        steps = tf.TensorSpec([], tf.int32, "steps")
        lr = tf.TensorSpec([], tf.float32, "inner_lr")
        query = exportable.image_spec(None, "query_images")
        self.serving_default = tf.function(self._predict, input_signature=[image])
        self.adapt = tf.function(self._adapt, input_signature=[support, labels, steps, lr])
        self.adapt_and_predict = tf.function(self._adapt_and_predict,
                                             input_signature=[support, labels, query, steps, lr])

    def _values(self, variables):
        return [tf.convert_to_tensor(v) for v in variables]

    def _predict(self, images):
        """Logits (B, max_ways) of the meta-initialisation, batch norm in inference mode with the
        statistics calibrated at the end of training (as ``MetaLearner(images)`` computes)."""
        return {"logits": self._ex.predict(images, self._values(self.params),
                                           self._values(self.bn_state))}

    def _adapt(self, support_images, support_labels, steps, inner_lr):
        """Adapted parameters; steps <= 0 and inner_lr <= 0 mean the exported defaults."""
        params, stats = self._run(support_images, support_labels, steps, inner_lr)
        out = {n: p for n, p in zip(self._ex.names, params)}
        out.update({n: s for n, s in zip(self._ex.bn, stats)})
        return out

    def _adapt_and_predict(self, support_images, support_labels, query_images, steps, inner_lr):
        """Query logits (Q, N) after adapting on the support set."""
        params, stats = self._run(support_images, support_labels, steps, inner_lr)
        logits = self._ex.predict(query_images, params,
                                  None if self._ex.spec.transductive else stats)
        ways = tf.reduce_max(support_labels) + 1
        return {"logits": logits[:, :ways]}

    def _run(self, support_x, support_y, steps, inner_lr):
        ex = self._ex
        tf.debugging.assert_greater(tf.size(support_y), 0, "the support set is empty")
        tf.debugging.assert_less(tf.reduce_max(support_y), ex.spec.max_ways,
                                 "support labels must be in 0..max_ways-1")
        mask = tf.ones_like(support_y, tf.float32)
        class_mask = tf.cast(tf.reduce_sum(tf.one_hot(support_y, ex.spec.max_ways), 0) > 0, tf.float32)
        steps = tf.where(steps > 0, steps, self.default_steps)
        lrs = [tf.where(inner_lr > 0, tf.fill(tf.shape(lr), inner_lr), lr) for lr in self._values(self.lrs)]
        params = self._values(self.params)
        params = params[:-2] + list(ex.init_head(support_x, support_y, mask, params))
        start = list(params)  # the proximal term's anchor (a proximal model only)

        def body(i, *ps):
            rates = lrs
            if self.per_step:  # MAML++: algorithms.rate_step's rule, on a step tensor
                rates = [tf.gather(lr, tf.minimum(i, tf.shape(lr)[0] - 1)) for lr in lrs]
            _, new = ex.adapt_step(support_x, support_y, mask, class_mask, list(ps), rates,
                                   start if ex.proximal else ())
            return (i + 1, *new)

        _, *params = tf.while_loop(lambda i, *ps: i < steps, body, (tf.constant(0), *params))
        stats = ex.support_stats(support_x, mask, params)
        return params, stats


def save(exportable: Exportable, default_steps: int, path) -> None:
    """Writes the SavedModel of ``exportable`` to ``path``."""
    module = AdaptationModule(exportable, default_steps)
    signatures = {"serving_default": module.serving_default, "adapt": module.adapt,
                  "adapt_and_predict": module.adapt_and_predict}
    tf.saved_model.save(module, str(path), signatures=signatures)
