"""Optimizer and learning-rate schedule: the reference CIFAR recipe by default."""

import keras

from ranet.config import OptimConfig


def total_steps(config: OptimConfig, steps_per_epoch: int) -> int:
    return config.train_steps or config.epochs * steps_per_epoch


def learning_rate_schedule(config: OptimConfig, steps_per_epoch: int):
    """Multi-step (x decay_rate at each decay fraction of training) or cosine with warm-up."""
    num_steps = total_steps(config, steps_per_epoch)
    peak = config.scaled_learning_rate
    if config.schedule == "multistep":
        # Epoch-based runs decay at epoch boundaries, as the reference's per-epoch schedule does.
        boundaries = sorted({round(f * config.epochs) * steps_per_epoch if config.train_steps is None
                             else int(f * num_steps) for f in config.decay_fractions})
        values = [peak * config.decay_rate ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), num_steps - 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=num_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=num_steps - warmup_steps, warmup_target=peak, warmup_steps=warmup_steps)


def create_optimizer(config: OptimConfig, steps_per_epoch: int, precision: str):
    """SGD with momentum; wrapped for dynamic loss scaling under mixed_float16.

    Weight decay is not Keras' decoupled ``weight_decay``: the reference adds
    ``weight_decay * w`` to every gradient (PyTorch SGD), which the train step
    reproduces as an L2 term in the loss.
    """
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate_schedule(config, steps_per_epoch),
                                     momentum=config.momentum, nesterov=config.nesterov)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
