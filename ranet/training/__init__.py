"""Training: ``train_and_evaluate(config)`` and the pieces it is made of.

``setup`` (strategy, data, model, optimizer, steps), ``steps`` (what one step does),
``controller`` (when to log, evaluate, save, stop), ``model_dir`` (layout, checks,
checkpoints), ``distribute`` (strategies, worker agreement), ``preemption`` (SIGTERM),
``optimizer`` (SGD and schedules), ``experiment`` (all of it together).
"""

from ranet.training.experiment import train_and_evaluate

__all__ = ["train_and_evaluate"]
