"""MetaLearner: a keras.Model whose train_step meta-learns an initialisation.

``fit()`` takes a dataset of meta-batches (Episode with a leading task axis). Each task of the
meta-batch is adapted by the one inner loop (``inner_loop.adapt``); the tasks are processed by
``tf.map_fn``, so the traced graph holds one copy of the inner loop whatever the meta-batch size.

A meta-batch may also be a ``FamilyBatch`` (task families mixed, padded to one shape with
masks): the meta-loss is then each task's loss times its weight, summed (sum_k alpha_k L_k),
and every family's query loss and accuracy are tracked under ``<family>_loss`` and
``<family>_accuracy``.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from mmtl_tf import best_step
from mmtl_tf.data.episodes import Episode
from mmtl_tf.data.families import FamilyBatch
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.meta import task_weighting
from mmtl_tf.meta.algorithms import (MetaConfig, inner_rate_schedule, multi_step_weights,
                                     resolve, training_problem)

NONFINITE_MARKER = "mmtl_tf: non-finite meta-loss"


@keras.saving.register_keras_serializable(package="mmtl_tf")
class MetaLearner(keras.Model):
    """Wraps a Keras feature encoder with a ``max_ways`` linear head and meta-learns both.

    Args:
      encoder: a Keras model (B, ...) -> (B, F); it is called only through ``stateless_call``.
      config: the MetaConfig (algorithm switches are resolved here).
      task: "classification" or "regression" (the head then has one output).
      families: names of the task families of ``FamilyBatch`` meta-batches (index k of a
        task's ``family`` is ``families[k]``), each tracked by its own metrics.
    """

    def __init__(self, encoder: keras.Model, config: MetaConfig = MetaConfig(),
                 task: str = "classification", families: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        if task not in ("classification", "regression"):
            raise ValueError(f"task={task!r} is not 'classification' or 'regression'")
        self.encoder = encoder
        self.config = resolve(config)
        self.task = task
        self.families = tuple(families)
        features = feature_dim(encoder)
        outputs = self.config.max_ways if task == "classification" else 1
        dtype = encoder.dtype_policy.variable_dtype
        self.head_w = self.add_weight((features, outputs), initializer="glorot_uniform",
                                      name="head_w", dtype=dtype)
        self.head_b = self.add_weight((outputs,), initializer="zeros", name="head_b", dtype=dtype)
        head_init = self.config.head_init if task == "classification" else "learned"
        num_encoder = len(encoder.trainable_variables)
        mask = (False,) * num_encoder + (True, True) if self.config.adapt_head_only else None
        self.loop = il.InnerLoop(encoder, task, head_init, self.config.transductive, mask,
                                 self.config.proximal)
        # Before adaptation a zero head scores every class alike (accuracy 1/N, loss log N by
        # construction): nothing to report, and one forward pass saved.
        self.track_pre_adaptation = self.config.track_pre_adaptation and head_init != "zero"
        self.inner_lrs = self._make_inner_lrs()
        self.family_loss = None  # recent post-adaptation loss per family (adaptive weighting)
        if self.config.family_weighting == "recent_loss":
            if not self.families:
                raise ValueError("family_weighting='recent_loss' needs the families' names")
            self.family_loss = self.add_weight((len(self.families),), initializer="zeros",
                                               trainable=False, name="family_recent_loss")
        self._trackers = {name: keras.metrics.Mean(name=name) for name in self._metric_names()}
        self._family_trackers = {(k, metric): keras.metrics.Mean(name=f"{family}_{metric}")
                                 for k, family in enumerate(self.families)
                                 for metric in self._family_metric_names()}
        self.built = True  # every weight exists now: the encoder is built, the head is created

    def get_config(self):
        import dataclasses

        return {"encoder": keras.saving.serialize_keras_object(self.encoder),
                "config": dataclasses.asdict(self.config), "task": self.task,
                "families": list(self.families), "name": self.name}

    @classmethod
    def from_config(cls, config):
        meta = dict(config["config"])
        return cls(keras.saving.deserialize_keras_object(config["encoder"]), MetaConfig(**meta),
                   task=config["task"], families=tuple(config.get("families", ())),
                   name=config.get("name"))

    # ----- parameters -------------------------------------------------------------------
    @property
    def meta_params(self):
        """The initialisation theta: encoder weights, then head_w (F, max_ways), head_b."""
        return list(self.encoder.trainable_variables) + [self.head_w, self.head_b]

    @property
    def meta_variables(self):
        """Everything the outer optimizer updates: theta plus learned inner learning rates."""
        return self.meta_params + list(self.inner_lrs)

    def _make_inner_lrs(self):
        kind, lr = self.config.learned_inner_lr, self.config.inner_lr
        if kind == "none":
            return []
        init = keras.initializers.Constant(lr)
        shape_of = (lambda p: tuple(p.shape)) if kind == "per_element" else (
            lambda p: (self.config.inner_steps,))
        return [self.add_weight(shape_of(p), initializer=init, name=f"inner_lr_{i}", dtype=p.dtype)
                for i, p in enumerate(self.meta_params)]

    def learning_rates(self, ways, inner_lrs=None):
        """``step -> per-parameter rates`` in the task layout (head rates sliced to N).
        ``inner_lrs``: values to use instead of the learned rate variables."""
        shared_head = self.loop.head_init != "learned" and self.task != "regression"
        learned = self.inner_lrs if inner_lrs is None else inner_lrs
        return inner_rate_schedule(self.config, learned, len(self.meta_params), ways, shared_head)

    # ----- one task, many tasks -----------------------------------------------------------
    def _task_metrics(self, episode, ways, steps, first_order, training=False, values=None,
                      masks=None):
        """Adapts to one task (no task axis). Returns (dict of scalar tensors, fast weights the
        task started from, adapted fast weights). ``training`` adds MAML++'s multi-step loss
        (``meta_loss``), whose weights follow the optimizer's step counter; for the pretrained
        baseline ``meta_loss`` is the starting weights' loss on support and query together.
        ``values``: tensors to use instead of ``meta_variables`` (theta, then the learned inner
        rates). ``masks``: (support rows, query rows, classes) of a padded task
        (``FamilyBatch``), or None."""
        support_mask, query_mask, class_mask = masks or (None, None, None)
        if values is None:
            values = [tf.convert_to_tensor(v) for v in self.meta_variables]
        count = len(self.meta_params)
        meta_params, inner_lrs = values[:count], values[count:]
        pretraining = training and not self.config.adapts_in_training
        if pretraining:
            pooled_loss = self._pooled_loss(episode, ways, meta_params)
            # The adaptation below only reports the usual metrics; nothing flows back through it.
            meta_params = [tf.stop_gradient(p) for p in meta_params]
        query_all = self.config.multi_step_loss and training
        adapted = il.adapt(self.loop, meta_params, episode.support_x, episode.support_y, ways,
                           steps, self.learning_rates(ways, inner_lrs), first_order,
                           query_x=episode.query_x if query_all else None,
                           sample_mask=support_mask, class_mask=class_mask, query_mask=query_mask)
        outputs = (adapted.query_outputs[-1] if query_all else
                   il.query_logits(self.loop, adapted.params, episode.support_x, episode.query_x,
                                   support_mask, query_mask, class_mask))
        post_loss = self.loop.loss(outputs, episode.query_y, query_mask)
        result = {"loss": post_loss, "support_loss": adapted.support_losses[-1]}
        if query_all:
            losses = tf.stack([self.loop.loss(o, episode.query_y, query_mask)
                               for o in adapted.query_outputs])
            weights = tf.cast(multi_step_weights(steps, self.optimizer.iterations,
                                                 self.config.multi_step_anneal), losses.dtype)
            result["meta_loss"] = tf.reduce_sum(weights * losses)
        else:
            result["meta_loss"] = pooled_loss if pretraining else post_loss
        if self.task == "classification":
            result["accuracy"] = _accuracy(outputs, episode.query_y, query_mask)
        if self.track_pre_adaptation:
            before = il.query_logits(self.loop, [tf.stop_gradient(p) for p in adapted.start],
                                     episode.support_x, episode.query_x, support_mask,
                                     query_mask, class_mask)
            result["pre_loss"] = self.loop.loss(before, episode.query_y, query_mask)
            if self.task == "classification":
                result["pre_accuracy"] = _accuracy(before, episode.query_y, query_mask)
        # Only meta_loss is differentiated. An outer tape's gradient of tf.map_fn (as around
        # task_metrics) sends zeros into every other output of the loop body, and TensorFlow
        # cannot tell they are zeros: it would backpropagate them through the support set's
        # forward passes (twice the convolution gradients of a first-order step).
        metrics = {name: tf.cast(value if name == "meta_loss" else tf.stop_gradient(value),
                                 tf.float32) for name, value in result.items()}
        return metrics, adapted.start, adapted.params

    def _pooled_loss(self, episode, ways, meta_params):
        """The pretrained baseline's training loss: the starting weights' mean loss on the
        task's support and query points together (K + Q), no adaptation."""
        start = self.loop.task_params(meta_params, episode.support_x, episode.support_y, ways)
        x = tf.concat([episode.support_x, episode.query_x], 0)  # (K + Q, ...)
        y = tf.concat([episode.support_y, episode.query_y], 0)
        return self.loop.loss(self.loop.logits(start, x), y)

    def task_metrics(self, episodes, steps, first_order=True, training=False):
        """Per-task metrics (each (tasks,)) of a meta-batch, tasks mapped by tf.map_fn:
        ``loss``/``accuracy`` of the queries after ``steps`` inner steps, ``support_loss``,
        ``pre_loss``/``pre_accuracy`` before adaptation, and the ``meta_loss`` training
        minimises (see ``_task_metrics``)."""
        ways = self._ways(episodes)
        signature = {n: tf.TensorSpec([], tf.float32) for n in self._metric_names() + ["meta_loss"]}
        fields, unpack = _mapped(episodes)

        def one_task(f):
            episode, masks, _ = unpack(f)
            return self._task_metrics(episode, ways, steps, first_order, training, masks=masks)[0]

        return tf.map_fn(one_task, fields, fn_output_signature=signature,
                         parallel_iterations=self.config.parallel_iterations)

    def _ways(self, episodes):
        if isinstance(episodes, FamilyBatch):
            episodes = episodes.episodes
        if self.task == "regression":
            return 1
        ways = episodes.class_ids.shape[-1]
        if ways is None:
            raise ValueError("episodes need a static number of ways (class_ids shape[-1])")
        if not 2 <= ways <= self.config.max_ways:
            raise ValueError(f"an episode has ways={ways}, outside 2..max_ways="
                             f"{self.config.max_ways}; raise max_ways or sample fewer ways")
        return int(ways)

    # ----- Keras hooks ----------------------------------------------------------------------
    def call(self, inputs, training=False):
        """Predicts with the meta-initialisation: (B, ...) -> (B, max_ways) logits."""
        features = tf.cast(self.encoder(inputs, training=training), self.head_w.dtype)
        return tf.matmul(features, self.head_w) + self.head_b

    @property
    def metrics(self):
        return list(self._trackers.values()) + list(self._family_trackers.values())

    def _family_metric_names(self):
        return ["loss", "accuracy"] if self.task == "classification" else ["loss"]

    def _metric_names(self):
        names = ["loss", "support_loss"]
        if self.task == "classification":
            names.append("accuracy")
        if self.track_pre_adaptation:
            names += ["pre_loss"] + (["pre_accuracy"] if self.task == "classification" else [])
        return names

    def _record(self, per_task, finite=None, data=None):
        """The logs of a step. Under XLA, which drops the train step's finiteness assertion,
        they also carry ``update_dropped`` (1 when the step's update was zeroed), on which
        training stops (``mmtl_tf.training``). For a FamilyBatch ``data``, each task counts
        by its weight in the overall metrics, and each family's metrics average its tasks."""
        weight = data.weight if isinstance(data, FamilyBatch) else None
        for name, tracker in self._trackers.items():
            tracker.update_state(per_task[name], sample_weight=weight)
        if isinstance(data, FamilyBatch):
            for (k, metric), tracker in self._family_trackers.items():
                tracker.update_state(per_task[metric], sample_weight=tf.cast(
                    tf.equal(data.family, k), tf.float32))
        logs = {t.name: t.result() for t in self.metrics}
        if self.family_loss is not None and isinstance(data, FamilyBatch):  # this step's shares
            shares = task_weighting.family_shares(data.weight, data.family, len(self.families))
            logs.update({f"{name}_alpha": shares[k] for k, name in enumerate(self.families)})
        if self.inner_lrs:  # learned inner rates (Meta-SGD, MAML++): their mean, as they move
            logs["inner_lr"] = tf.reduce_mean(tf.concat([tf.reshape(v, [-1]) for v in self.inner_lrs], 0))
        if finite is not None and self.jit_compile:
            logs["update_dropped"] = 1.0 - tf.cast(finite, tf.float32)
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages multi-worker logs with reduce(MEAN, axis=0), which needs an axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds a distributed model by reducing a data batch across replicas first,
        which MultiWorkerMirroredStrategy's collectives cannot do for integer episode fields.
        Every weight already exists here, so only the optimizer needs building."""
        if not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.meta_variables)

    def train_step(self, data):
        data = as_episodes(data)
        if self.config.reptile:
            return self._reptile_step(data)
        if self.family_loss is not None and isinstance(data, FamilyBatch):
            data = data._replace(weight=task_weighting.reweighted(data.weight, data.family,
                                                                  self.family_loss))
        variables = self.meta_variables
        first_order = self._first_order()
        if isinstance(first_order, bool):
            per_task, grads = self.meta_gradients(data, first_order)
        else:  # derivative-order annealing: a branch per order (see meta_gradients)
            per_task, grads = tf.cond(first_order, lambda: self.meta_gradients(data, True),
                                      lambda: self.meta_gradients(data, False))
        grads, regularizer = self._regularized(grads, variables)
        loss = _weighted_mean(per_task["meta_loss"], data) + regularizer
        finite = self._apply_if_finite(loss, grads, variables)
        if self.family_loss is not None and isinstance(data, FamilyBatch):
            self.family_loss.assign(task_weighting.updated_recent(
                self.family_loss, per_task["loss"], data.family, self.config.family_loss_momentum))
        return self._record(per_task, finite, data)

    def _regularized(self, grads, variables):
        """(``grads`` plus the gradient of lambda R(theta), scaled as the meta-gradients are;
        lambda R(theta)). Learned inner rates are not decayed."""
        with tf.GradientTape() as tape:
            regularizer = self._regularizer()
            scaled = self.optimizer.scale_loss(regularizer / _replicas())
        if self.config.weight_decay:
            decay = tape.gradient(scaled, variables)  # None for learned inner rates
            grads = [g if r is None else g + r for g, r in zip(grads, decay)]
        return grads, regularizer

    def meta_gradients(self, episodes, first_order: bool):
        """Per-task metrics (as ``task_metrics``, training) and the gradient of the mean
        meta-loss with respect to ``meta_variables``, scaled as the optimizer scales a loss and
        divided by the replicas (gradients are summed across replicas; a loss-scale optimizer
        unscales them in apply()).

        Each task's gradient is taken inside the ``tf.map_fn`` body and the results summed:
        differentiating the map from outside instead makes TensorFlow stack every task's
        intermediates in loop accumulators and, for the second order, fill zero gradients for
        them; this is the same sum, a third fewer operations per step (issue #15).
        ``first_order`` is a Python bool: a boolean tensor switching the order inside the body
        (``inner_loop``'s annealing form) makes TensorFlow build a cyclic graph there.
        """
        ways = self._ways(episodes)
        variables = self.meta_variables
        fields, unpack = _mapped(episodes)
        if self.inner_lrs:
            # Learned inner rates (Meta-SGD, MAML++): a tape inside the loop body taking the
            # second-order gradient of a rate times a gradient builds a cyclic graph in
            # TensorFlow 2.21 ("nodes in a cycle"), so these differentiate the map from outside.
            with tf.GradientTape() as tape:
                per_task = self.task_metrics(episodes, self.config.inner_steps, first_order,
                                             training=True)
                scaled = self.optimizer.scale_loss(_weighted_mean(per_task["meta_loss"], episodes)
                                                   / _replicas())
            return per_task, tape.gradient(scaled, variables)
        tasks = tf.cast(tf.shape(tf.nest.flatten(fields)[0])[0], tf.float32)

        def one_task(fields):
            # Differentiated with respect to the values read here: a Python-bool order and
            # plain tensors keep TensorFlow from building a cyclic graph in the loop body.
            values = [tf.convert_to_tensor(v) for v in variables]
            episode, masks, weight = unpack(fields)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(values)
                metrics = self._task_metrics(episode, ways, self.config.inner_steps,
                                             first_order, training=True, values=values,
                                             masks=masks)[0]
                if weight is None:  # the mean over the meta-batch
                    scaled = self.optimizer.scale_loss(metrics["meta_loss"] / (tasks * _replicas()))
                else:  # the task's share of sum_k alpha_k L_k
                    scaled = self.optimizer.scale_loss(metrics["meta_loss"] * weight / _replicas())
            # a zero head's meta-head gets no gradient: zeros, as map_fn needs tensors
            return metrics, tape.gradient(scaled, values, unconnected_gradients="zero")

        metrics = {n: tf.TensorSpec([], tf.float32) for n in self._metric_names() + ["meta_loss"]}
        grads = [tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for v in variables]
        per_task, grads = tf.map_fn(one_task, fields, fn_output_signature=(metrics, grads),
                                    parallel_iterations=self.config.parallel_iterations)
        return per_task, [tf.reduce_sum(g, 0) for g in grads]

    def make_test_function(self, force=False):
        """Always a fresh function: ways are static in the traced graph, and Keras relaxes
        the shapes of a retraced function, so evaluating at another N needs a new trace."""
        return super().make_test_function(force=True)

    def test_step(self, data):
        data = as_episodes(data)
        return self._record(self.task_metrics(data, self.config.eval_inner_steps), data=data)

    def _first_order(self):
        if self.config.first_order:
            return True
        if self.config.first_order_until > 0:
            return self.optimizer.iterations < self.config.first_order_until
        return False

    def _regularizer(self):
        if not self.config.weight_decay:
            return 0.0
        return self.config.weight_decay * tf.add_n([tf.reduce_sum(tf.square(p)) for p in self.meta_params])

    def compile(self, optimizer="adam", **kwargs):
        """Keras' compile, after refusing a configuration whose meta-training would not do what
        its name says (``algorithms.training_problem``). Keras wraps the optimizer in a
        LossScaleOptimizer under the mixed_float16 policy; ``train_step`` scales the loss."""
        problem = training_problem(self.config, self.loop.head_init, self.task)
        if problem:
            raise ValueError(problem)
        super().compile(optimizer=optimizer, **kwargs)

    def _apply_if_finite(self, loss, grads, variables):
        """Applies the outer update; a non-finite loss or gradient stops training instead.

        XLA (``jit_compile=True``) drops assertions: there the non-finite step's gradients are
        zeroed instead, so no NaN reaches the weights, and the returned flag (False: the update
        was dropped) goes into the logs, on which training stops. Under loss scaling a
        non-finite gradient is an overflow of the scaled loss, not a divergence: the
        LossScaleOptimizer skips that step and lowers its scale, so only the loss is checked.
        """
        finite = tf.math.is_finite(loss)
        loss_scaling = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if not loss_scaling:
            finite = tf.logical_and(finite, tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
        check = tf.debugging.Assert(finite, [
            NONFINITE_MARKER, "at meta-step", self.optimizer.iterations + 1,
            "(loss", loss, f"); inner_lr={self.config.inner_lr} or the meta learning rate is "
            "too large for this model: lower them. No update was applied."])
        with tf.control_dependencies([check]):
            grads = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
            self.optimizer.apply(grads, variables)
        return finite

    def _reptile_step(self, data):
        """theta <- theta + epsilon * (mean adapted phi - theta), epsilon from the optimizer.

        Each task adapts on its support set (the Reptile paper's inner loop on the task's K
        shots); the same adaptation gives the held-out query metrics every algorithm reports.
        The pseudo-gradient (theta - phi) goes to the compiled optimizer, so plain SGD with
        learning rate epsilon applies exactly the Reptile formula. Only a learned head has a
        meta-head to move.
        """
        ways = self._ways(data)
        theta = [tf.convert_to_tensor(p) for p in self.meta_params]

        def one_task(fields):
            metrics, start, phi = self._task_metrics(Episode(*fields), ways,
                                                     self.config.inner_steps, True, training=True)
            return metrics, [a - b for a, b in zip(start, phi)]

        metrics = {n: tf.TensorSpec([], tf.float32) for n in self._metric_names() + ["meta_loss"]}
        deltas = [tf.TensorSpec(p.shape, tf.float32) for p in theta[:-2]] + [
            tf.TensorSpec([theta[-2].shape[0], ways], tf.float32), tf.TensorSpec([ways], tf.float32)]
        per_task, deltas = tf.map_fn(one_task, tuple(data), fn_output_signature=(metrics, deltas),
                                     parallel_iterations=self.config.parallel_iterations)
        grads = [tf.reduce_mean(d, 0) for d in deltas]
        extra = self.config.max_ways - ways if self.task == "classification" else 0
        if self.loop.head_init == "learned":
            grads[-2:] = [tf.pad(grads[-2], [[0, 0], [0, extra]]), tf.pad(grads[-1], [[0, extra]])]
        else:
            grads[-2:] = [tf.zeros_like(theta[-2]), tf.zeros_like(theta[-1])]
        grads += [tf.zeros_like(v) for v in self.inner_lrs]
        # As train_step's loss: summed across replicas, unscaled by a loss-scale optimizer.
        scale = self.optimizer.scale_loss(tf.constant(1.0)) / _replicas()
        grads = [g * tf.cast(scale, g.dtype) for g in grads]
        grads, _ = self._regularized(grads, self.meta_variables)  # lambda R(theta) as for MAML
        finite = self._apply_if_finite(tf.reduce_mean(per_task["loss"]), grads, self.meta_variables)
        return self._record(per_task, finite)

    # ----- adaptation for users -------------------------------------------------------------
    def adapt(self, support_x, support_y, ways=None, steps=None):
        """Fast weights for one task: support_x (N*K, ...), support_y (N*K,) labels 0..N-1.

        Returns the task parameters ``[*encoder_params, head_w (F, N), head_b (N,)]`` of the
        step with the lowest support loss (``mmtl_tf.best_step``, as the device runtime), as
        an ``AdaptedParams`` list whose ``status`` says (and an AdaptationWarning warns) when
        that is not the last step. Raises ValueError for an empty support set or N outside
        2..max_ways, and FloatingPointError when a step's support loss is not finite.
        """
        support_y = tf.convert_to_tensor(support_y)
        if int(tf.size(support_y)) == 0:
            raise ValueError("the support set is empty: give at least one example per class")
        if ways is None:
            ways = 1 if self.task == "regression" else int(tf.reduce_max(support_y)) + 1
        if self.task == "classification" and not 2 <= int(ways) <= self.config.max_ways:
            raise ValueError(f"ways={int(ways)} is outside 2..max_ways={self.config.max_ways}: "
                             "give at least two classes, or meta-train with a larger max_ways")
        steps = self.config.eval_inner_steps if steps is None else steps
        meta_params = [tf.convert_to_tensor(p) for p in self.meta_params]
        adapted = il.adapt(self.loop, meta_params, tf.convert_to_tensor(support_x), support_y,
                           ways, steps, self.learning_rates(ways), True)
        losses = adapted.support_losses.numpy()
        if not np.isfinite(losses).all():
            step = int(np.argmin(np.isfinite(losses)))  # losses[k] is the loss before step k+1
            raise FloatingPointError(
                f"the support loss is not finite after {step} adaptation step(s) "
                f"(losses {losses.tolist()}): lower the inner learning rate or the steps")
        kept = best_step.kept_step(losses)
        if kept < steps:  # adaptation is deterministic: the first `kept` steps again
            adapted = il.adapt(self.loop, meta_params, tf.convert_to_tensor(support_x), support_y,
                               ways, kept, self.learning_rates(ways), True)
        result = AdaptedParams(adapted.params, losses.tolist(), kept,
                               best_step.status(losses, kept))
        if result.status != "ok":
            warnings.warn(result.status, best_step.AdaptationWarning, stacklevel=2)
        return result

    def predict_adapted(self, params, query_x, support_x=None):
        """Outputs (B, N) at fast weights ``params``; non-transductive mode needs support_x."""
        if not self.loop.transductive and support_x is None:
            raise ValueError("non-transductive batch norm needs the support set: pass support_x")
        return il.query_logits(self.loop, params, support_x, tf.convert_to_tensor(query_x))


def _replicas() -> int:
    """Replicas of the current tf.distribute strategy, across which gradients are summed."""
    return tf.distribute.get_strategy().num_replicas_in_sync


class AdaptedParams(list):
    """``MetaLearner.adapt``'s task parameters, with ``support_losses`` (after 0..steps
    steps), ``steps_run`` (the step kept) and ``status`` ("ok" or ``best_step.status``)."""

    def __init__(self, params, support_losses, steps_run, status):
        super().__init__(params)
        self.support_losses, self.steps_run, self.status = support_losses, steps_run, status


def _accuracy(logits, labels, mask=None):
    """Fraction of rows whose argmax is the label; with ``mask`` (B,), of the real rows."""
    predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    correct = tf.cast(tf.equal(predicted, labels), tf.float32)
    if mask is None:
        return tf.reduce_mean(correct)
    mask = tf.cast(mask, tf.float32)
    return tf.reduce_sum(correct * mask) / tf.reduce_sum(mask)


def _mapped(data):
    """(the fields ``tf.map_fn`` maps over, ``fields -> (Episode, masks, weight)``) of a
    meta-batch: masks and weight are None for plain episodes."""
    if isinstance(data, FamilyBatch):
        fields = (tuple(data.episodes), (data.support_mask, data.query_mask, data.class_mask),
                  data.weight)
        return fields, lambda f: (Episode(*f[0]), tuple(f[1]), f[2])
    return tuple(data), lambda f: (Episode(*f), None, None)


def _weighted_mean(per_task, data):
    """The meta-batch's loss: the mean over tasks, or for a FamilyBatch the weighted sum."""
    if isinstance(data, FamilyBatch):
        return tf.reduce_sum(per_task * data.weight)
    return tf.reduce_mean(per_task)



def feature_dim(encoder) -> int:
    """F, the width of the encoder's output."""
    if getattr(encoder, "feature_dim", None):
        return int(encoder.feature_dim)
    return int(encoder.output.shape[-1])


def as_episodes(data) -> Episode:
    """The meta-batch in what Keras hands a step: an Episode, or (Episode, None, None) from
    train_on_batch / test_on_batch."""
    if isinstance(data, (Episode, FamilyBatch)):
        return data
    if isinstance(data, tuple) and data and isinstance(data[0], (Episode, FamilyBatch)):
        if any(part is not None for part in data[1:]):
            raise ValueError("episodes carry their own labels: pass only the Episode, no y or "
                             "sample_weight")
        return data[0]
    raise TypeError(f"expected an Episode meta-batch, got {type(data).__name__}; build the "
                    "dataset with mmtl_tf.data.episodes.episode_dataset")
