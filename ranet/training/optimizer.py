"""Optimizer and learning-rate schedule: the reference CIFAR recipe by default."""

import math

import keras
import tensorflow as tf

from ranet.config import OptimConfig, StepPlan


@keras.saving.register_keras_serializable(package="ranet")
class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from zero, then multistep, cosine or linear decay to the end of a plan.

    Keras' schedules fix their length when they are built, and warm up only before a cosine;
    a time-budgeted run learns its length after it has started (``set_plan``), and every
    schedule may warm up. The plan lives in variables, so the optimizer's compiled step reads
    the new one without retracing.
    """

    def __init__(self, kind: str, peak: float, decay_rate: float, plan: StepPlan):
        self.kind, self.peak, self.decay_rate = kind, float(peak), float(decay_rate)
        self.total_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="total_steps")
        self.warmup_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="warmup_steps")
        self.decay_steps = tf.Variable(tf.zeros([len(plan.decay_steps)], tf.int64),
                                       trainable=False, name="decay_steps")
        self.set_plan(plan)

    def set_plan(self, plan: StepPlan) -> None:
        self.total_steps.assign(plan.total_steps)
        self.warmup_steps.assign(plan.warmup_steps)
        self.decay_steps.assign(tf.constant(plan.decay_steps, tf.int64, [len(plan.decay_steps)]))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(self.warmup_steps, tf.float32)
        total = tf.cast(self.total_steps, tf.float32)
        progress = tf.clip_by_value((step - warmup) / tf.maximum(total - warmup, 1.0), 0.0, 1.0)
        if self.kind == "multistep":
            passed = tf.reduce_sum(tf.cast(step > tf.cast(self.decay_steps, tf.float32),
                                           tf.float32))
            decayed = self.peak * tf.pow(self.decay_rate, passed)
        elif self.kind == "cosine":
            decayed = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            decayed = self.peak * (1.0 - progress)
        return tf.where(step < warmup, self.peak * step / tf.maximum(warmup, 1.0), decayed)

    def get_config(self):
        return {"kind": self.kind, "peak": self.peak, "decay_rate": self.decay_rate}


def learning_rate_schedule(config: OptimConfig, plan: StepPlan) -> StepSchedule:
    """The schedule of ``config`` over ``plan`` (multistep: x decay_rate after each decay step)."""
    return StepSchedule(config.schedule, config.scaled_learning_rate, config.decay_rate, plan)


def create_optimizer(config: OptimConfig, schedule: StepSchedule, precision: str):
    """SGD with momentum at ``schedule``; wrapped for dynamic loss scaling under mixed_float16.

    Weight decay is not Keras' decoupled ``weight_decay``: the reference adds
    ``weight_decay * w`` to every gradient (PyTorch SGD), which the train step
    reproduces as an L2 term in the loss.
    """
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum,
                                     nesterov=config.nesterov)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
