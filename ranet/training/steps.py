"""What one training or evaluation step does, under any tf.distribute strategy.

The loop that decides when to run them lives in ``ranet.training.controller``. Everything
here is tf.function-clean: no numpy, no Python state changing per step.
"""

from typing import Optional

import tensorflow as tf

from ranet.config import OptimConfig
from ranet.errors import UsageError
from ranet.models import StagedClassifier


def exit_cross_entropy(labels, logits, label_smoothing: float = 0.0):
    """Per-example cross-entropy of one exit, in float32."""
    logits = tf.cast(logits, tf.float32)
    if not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(labels, num_classes) * (1.0 - label_smoothing)
    targets += label_smoothing / tf.cast(num_classes, tf.float32)
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def distillation_sums(labels, all_logits, temperature: float, weight: float,
                      label_smoothing: float = 0.0):
    """Summed per-exit objective of one-for-all knowledge distillation (Li et al., ICCV 2019).

    Exit k < K: (1 - weight) x cross-entropy + weight x T^2 x KL(q_K || p_k), where q_K and p_k
    are the softmaxes at temperature T of the last exit (a fixed target: no gradient flows
    into it) and of exit k; the KL is summed over classes per image (the IMTA code's
    ``nn.KLDivLoss()`` averaged over classes too, dividing the term by C). The last exit
    learns from the labels alone. Returns float32 [K], summed over the batch.
    """
    labels = tf.cast(labels, tf.int32)
    teacher = tf.stop_gradient(tf.nn.softmax(tf.cast(all_logits[-1], tf.float32) / temperature))
    sums = []
    for logits in all_logits[:-1]:
        log_student = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature)
        kl = tf.reduce_sum(teacher * (tf.math.log(tf.maximum(teacher, 1e-30)) - log_student),
                           axis=-1)
        cross_entropy = exit_cross_entropy(labels, logits, label_smoothing)
        sums.append(tf.reduce_sum((1.0 - weight) * cross_entropy
                                  + weight * temperature ** 2 * kl))
    sums.append(tf.reduce_sum(exit_cross_entropy(labels, all_logits[-1], label_smoothing)))
    return tf.stack(sums)


def _exit_statistics(labels, all_logits, label_smoothing=0.0, weights=None):
    """Summed (optionally weighted) loss and correct predictions of every exit over a batch."""
    labels = tf.cast(labels, tf.int32)
    if weights is None:
        weights = tf.ones_like(labels, tf.float32)
    loss_sums = tf.stack([tf.reduce_sum(weights * exit_cross_entropy(labels, logits, label_smoothing))
                          for logits in all_logits])
    correct = tf.stack([tf.reduce_sum(weights * tf.cast(
        tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
        for logits in all_logits])
    return loss_sums, correct


class TrainMetrics:
    """Running sums since the last reset, kept per replica and summed on read."""

    def __init__(self, num_exits: int):
        def accumulator(name, shape):
            return tf.Variable(tf.zeros(shape), name=name, trainable=False,
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.SUM)
        self.loss_sums = accumulator("loss_sums", [num_exits])
        self.correct = accumulator("correct", [num_exits])
        self.examples = accumulator("examples", [])
        self.total_loss_sum = accumulator("total_loss_sum", [])

    def update(self, loss_sums, correct, examples, total_loss_sum):
        self.loss_sums.assign_add(loss_sums)
        self.correct.assign_add(correct)
        self.examples.assign_add(examples)
        self.total_loss_sum.assign_add(total_loss_sum)

    def result(self) -> dict:
        """Host-side means over the examples since the last reset."""
        examples = max(float(self.examples.numpy()), 1.0)
        return {"loss/total": float(self.total_loss_sum.numpy()) / examples,
                **{f"loss/exit_{k + 1}": float(v) / examples
                   for k, v in enumerate(self.loss_sums.numpy())},
                **{f"accuracy/exit_{k + 1}": float(v) / examples
                   for k, v in enumerate(self.correct.numpy())}}

    def reset(self) -> None:
        for variable in (self.loss_sums, self.correct, self.examples, self.total_loss_sum):
            variable.assign(tf.zeros_like(variable))


class TrainingSteps:
    """Compiled train and eval steps for one model, optimizer and strategy.

    Loss (from ``optim``): the (optionally weighted) sum over exits of the batch-mean
    cross-entropy (with ``exit_distillation``, ``distillation_sums`` instead), plus the
    reference's coupled L2 term ``weight_decay/2 * sum(w**2)`` over every trainable variable
    (PyTorch SGD's weight_decay), scaled for the replicas; under mixed_float16 the loss is
    scaled and non-finite steps are skipped by the LossScaleOptimizer. The metrics keep each
    exit's cross-entropy; ``loss/total`` is the objective.

    ``run_steps`` ends early, at a step boundary, when the global loss of a
    step is not finite (with ``stop_on_nonfinite``; leave it off under
    mixed_float16) or when any worker's ``stop_request`` (a local, non-
    distributed variable another thread may set, e.g. on SIGTERM) is non-zero.
    Both are summed over every replica of every worker in one all-reduce per
    step, so all workers stop at the same step.
    """

    def __init__(self, model: StagedClassifier, optimizer, strategy: tf.distribute.Strategy,
                 optim: OptimConfig, *, xla: bool = False, stop_on_nonfinite: bool = True,
                 stop_request: Optional[tf.Variable] = None):
        num_exits = model.num_exits
        if optim.exit_weights is not None and len(optim.exit_weights) != num_exits:
            raise UsageError(f"--exit_weights needs one weight per exit ({num_exits}). "
                             f"Received: {len(optim.exit_weights)} weights")
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.global_batch_size = optim.batch_size
        self.weight_decay = optim.weight_decay
        self.label_smoothing = optim.label_smoothing
        self.distillation = ((optim.distillation_temperature, optim.distillation_weight)
                             if optim.exit_distillation else None)
        self.exit_weights = tf.constant(optim.exit_weights or [1.0] * num_exits, tf.float32)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.stop_request = stop_request
        with strategy.scope():
            self.metrics = TrainMetrics(num_exits)
            self.global_step = tf.Variable(0, dtype=tf.int64, name="global_step", trainable=False,
                                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # XLA compiles only the per-replica forward/backward: XLA of the whole distributed
        # step (apply_gradients included) fails under MirroredStrategy. Without XLA it runs
        # inline in the compiled loop: synchronized batch norm's cross-replica merge_call
        # fails inside a nested tf.function.
        self._forward_backward = (tf.function(self._forward_backward_fn, jit_compile=True)
                                  if xla else self._forward_backward_fn)
        self.run_steps = tf.function(self._run_steps)
        self.repeat_step = tf.function(self._repeat_step)
        self.evaluate = tf.function(self._evaluate)

    def _forward_backward_fn(self, images, labels):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            all_logits = self.model(images, training=True)
            loss_sums, correct = _exit_statistics(labels, all_logits, self.label_smoothing)
            objective = loss_sums if self.distillation is None else distillation_sums(
                labels, all_logits, *self.distillation, self.label_smoothing)
            total = tf.reduce_sum(objective * self.exit_weights)
            loss = total / self.global_batch_size
            if self.weight_decay:
                l2 = self.weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in variables])
                loss += tf.nn.scale_regularization_loss(l2)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        return gradients, loss_sums, correct, total, loss

    def _replica_train_step(self, images, labels, stop_vote):
        gradients, loss_sums, correct, total, loss = self._forward_backward(images, labels)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        self.metrics.update(loss_sums, correct, tf.cast(tf.shape(labels)[0], tf.float32), total)
        # This replica's share of the global loss, and its worker's stop vote.
        return tf.stack([tf.cast(loss, tf.float32), stop_vote])

    def _run_steps(self, iterator, num_steps):
        """Runs up to ``num_steps`` steps in one call, so Python overhead is paid once per call.

        Returns ``{"steps": steps run, "finite": whether the last step's loss was finite,
        "stop_requested": whether a worker asked to stop}``; ``global_step`` counts the steps
        run, the last one included.
        """
        steps_run = tf.constant(0, tf.int32)
        finite, stop_requested = tf.constant(True), tf.constant(False)
        for _ in tf.range(num_steps):
            # Read on the host, passed in as an argument: one vote per worker per step.
            stop_vote = (tf.cast(self.stop_request.read_value(), tf.float32)
                         if self.stop_request is not None else tf.constant(0.0))
            images, labels = next(iterator)
            per_replica = self.strategy.run(self._replica_train_step,
                                            args=(images, labels, stop_vote))
            loss, votes = tf.unstack(
                self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
            self.global_step.assign_add(1)
            steps_run += 1
            if self.stop_on_nonfinite:
                finite = tf.math.is_finite(loss)
            stop_requested = votes > 0
            if stop_requested or not finite:
                break
        return {"steps": steps_run, "finite": finite, "stop_requested": stop_requested}

    def _repeat_step(self, images, labels, num_steps):
        """The bare step, ``num_steps`` times on one distributed batch: no input, no checks.

        What the training loop costs is measured against this (``ranet.bench.train``).
        """
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_train_step, args=(images, labels, tf.constant(0.0)))

    def _replica_eval_step(self, images, labels, weights):
        all_logits = self.model(images, training=False)
        loss_sums, correct = _exit_statistics(labels, all_logits, weights=weights)
        return tf.concat([loss_sums, correct, [tf.reduce_sum(weights)]], axis=0)

    def _evaluate(self, dataset):
        """Summed [loss per exit, correct per exit, examples] over a distributed dataset."""
        totals = tf.zeros([2 * self.model.num_exits + 1])
        for images, labels, weights in dataset:
            per_replica = self.strategy.run(self._replica_eval_step, args=(images, labels, weights))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return totals

    def eval_metrics(self, dataset) -> dict:
        totals = self.evaluate(dataset).numpy()
        k = self.model.num_exits
        examples = max(float(totals[-1]), 1.0)
        return {**{f"loss/exit_{i + 1}": float(totals[i]) / examples for i in range(k)},
                **{f"accuracy/exit_{i + 1}": float(totals[k + i]) / examples for i in range(k)},
                "examples": int(totals[-1])}
