"""Optimizer and learning-rate schedule: the reference CIFAR recipe by default."""

import keras

from ranet.config import OptimConfig, StepPlan


def learning_rate_schedule(config: OptimConfig, plan: StepPlan):
    """Multi-step (x decay_rate after each of ``plan.decay_steps``) or cosine with warm-up."""
    peak = config.scaled_learning_rate
    if config.schedule == "multistep":
        values = [peak * config.decay_rate ** i for i in range(len(plan.decay_steps) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(list(plan.decay_steps), values)
    if plan.warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=plan.total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=plan.total_steps - plan.warmup_steps, warmup_target=peak,
        warmup_steps=plan.warmup_steps)


def create_optimizer(config: OptimConfig, plan: StepPlan, precision: str):
    """SGD with momentum; wrapped for dynamic loss scaling under mixed_float16.

    Weight decay is not Keras' decoupled ``weight_decay``: the reference adds
    ``weight_decay * w`` to every gradient (PyTorch SGD), which the train step
    reproduces as an L2 term in the loss.
    """
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate_schedule(config, plan),
                                     momentum=config.momentum, nesterov=config.nesterov)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
