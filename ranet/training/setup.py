"""One training set-up, for the trainer and the benchmarks alike.

``create_strategy`` prepares the process (devices, precision, determinism) and returns the
strategy; ``check`` refuses a configuration that cannot train before anything is loaded or
written; ``build`` loads the data, plans the run in steps and builds the model, optimizer and
compiled steps under the strategy's scope.
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

from ranet import config as config_lib
from ranet import data, devices, models
from ranet.errors import UsageError
from ranet.training import distribute
from ranet.training.optimizer import StepSchedule, create_optimizer, learning_rate_schedule
from ranet.training.steps import TrainingSteps


@dataclasses.dataclass(eq=False)
class Training:
    """Everything a training run (or a benchmark of one) works with.

    It changes in one way only: ``set_total_steps`` (a time budget's plan) moves ``plan`` and
    the schedule the optimizer reads together.
    """
    config: config_lib.ExperimentConfig
    strategy: tf.distribute.Strategy
    splits: data.DataSplits
    plan: config_lib.StepPlan
    model: models.StagedClassifier
    schedule: StepSchedule
    optimizer: keras.optimizers.Optimizer
    steps: TrainingSteps

    def set_total_steps(self, total_steps: int) -> None:
        """Makes this training ``total_steps`` long; the schedule's variables follow, so the
        compiled step reads the new schedule without retracing."""
        self.plan = config_lib.plan_steps(self.config.optim, self.config.runtime,
                                          self.plan.steps_per_epoch, total_steps)
        self.schedule.set_plan(self.plan)

    def train_dataset(self, start_step: int = 0) -> tf.distribute.DistributedDataset:
        """The augmented training stream from global step ``start_step`` on, over the replicas."""
        return self.strategy.distribute_datasets_from_function(data.train_input_fn(
            self.splits.train, global_batch_size=self.config.optim.batch_size,
            mean=self.splits.mean, std=self.splits.std, seed=self.config.runtime.seed,
            augment=self.config.data.augment, crop_padding=self.config.data.crop_padding,
            start_step=start_step,
            deterministic=self.config.runtime.deterministic,
            skip_bad_records=self.config.data.skip_bad_records,
            tf_data_service=self.config.data.tf_data_service))

    def validation_dataset(self) -> Optional[tf.distribute.DistributedDataset]:
        """One pass over the validation split, or None when there is none."""
        if len(self.splits.validation) == 0:
            return None
        return self.strategy.distribute_datasets_from_function(data.eval_input_fn(
            self.splits.validation, global_batch_size=self.config.optim.batch_size,
            mean=self.splits.mean, std=self.splits.std))


def create_strategy(runtime: config_lib.RuntimeConfig) -> tf.distribute.Strategy:
    """Prepares the process for ``runtime`` and returns its tf.distribute strategy."""
    devices.configure_host_devices(runtime.num_cpu_devices)
    devices.configure_threads(runtime.intra_op_threads, runtime.inter_op_threads)
    devices.set_precision(runtime.precision)
    if runtime.deterministic:
        keras.utils.set_random_seed(runtime.seed)
        tf.config.experimental.enable_op_determinism()
    return distribute.create_strategy(runtime)


def check(config: config_lib.ExperimentConfig, strategy: tf.distribute.Strategy) -> None:
    """Raises ``UsageError`` for a configuration that cannot train on ``strategy``."""
    models.validate(config.model)
    models.check_trainable(config.model, config.optim.trainable)
    replicas = strategy.num_replicas_in_sync
    if config.optim.batch_size % replicas:
        raise UsageError(f"--batch_size={config.optim.batch_size} is global and must divide "
                         f"evenly over {replicas} replicas; use a multiple of {replicas}.")


def build(config: config_lib.ExperimentConfig, strategy: tf.distribute.Strategy, *,
          stop_request: Optional[tf.Variable] = None) -> Training:
    """Loads the data and builds the model, optimizer and steps of ``config`` (``check`` first).

    ``stop_request``: a local variable another thread may set to end the loop at the next
    step boundary (``PreemptionWatcher.flag``).
    """
    runtime = config.runtime
    splits = data.load_splits(config.data)
    plan = config_lib.plan_steps(config.optim, runtime, data.steps_per_epoch(
        len(splits.train), config.optim.batch_size))
    with strategy.scope():
        keras.utils.set_random_seed(runtime.seed)
        with models.gradient_equilibrium(config.optim.gradient_equilibrium), \
                models.serving_layout(runtime.training_layout == "serving"):
            model = models.get_model(config.model)
        models.set_trainable(config.model, model, config.optim.trainable)
        schedule = learning_rate_schedule(config.optim, plan)
        optimizer = create_optimizer(config.optim, schedule, runtime.precision)
        optimizer.build(model.trainable_variables)
        steps = TrainingSteps(model, optimizer, strategy, config.optim, xla=runtime.xla,
                              stop_on_nonfinite=runtime.precision != "mixed_float16",
                              stop_request=stop_request)
    return Training(config=config, strategy=strategy, splits=splits, plan=plan, model=model,
                    schedule=schedule, optimizer=optimizer, steps=steps)
