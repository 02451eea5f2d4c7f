"""What the benchmarks share: a preset's training set-up on the benchmark's own terms."""

import dataclasses
from typing import Optional

from ranet import cli
from ranet import config as config_lib


def preset_experiment(preset: str, *, batch_size: int, precision: str = "fp32",
                      strategy: str = "default", num_cpu_devices: int = 0,
                      data_dir: Optional[str] = None,
                      xla: bool = False,
                      training_layout: str = "sliced") -> config_lib.ExperimentConfig:
    """A preset's model and recipe at ``batch_size`` on real CIFAR-10 or synthetic images.

    Synthetic data (``data_dir`` None) is as large as the pipeline needs and holds nothing out;
    the model keeps the preset's architecture with the data's number of classes.
    """
    config = cli.preset_config(preset)
    data = (config_lib.DataConfig(dataset="cifar10", data_dir=data_dir) if data_dir else
            config_lib.DataConfig(dataset="synthetic", validation_size=0,
                                  synthetic_train_size=max(2048, 4 * batch_size)))
    return config_lib.ExperimentConfig(
        data=data, model=dataclasses.replace(config.model, num_classes=data.num_classes),
        optim=dataclasses.replace(config.optim, batch_size=batch_size),
        runtime=config_lib.RuntimeConfig(strategy=strategy, precision=precision,
                                         num_cpu_devices=num_cpu_devices, xla=xla,
                                         training_layout=training_layout))
