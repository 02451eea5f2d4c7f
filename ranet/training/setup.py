"""What the benchmarks share: presets by name, and a training set-up without a model_dir."""

import os

from absl import flags

from ranet import cli

_FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "flags")


def preset_model(name: str):
    """The ModelConfig of a flagfile preset, parsed apart from this binary's own flags."""
    preset_flags = flags.FlagValues()
    cli.define_flags(preset_flags)
    preset_flags(["preset", f"--flagfile={os.path.join(_FLAGS_DIR, name + '.cfg')}"])
    return cli.model_config(preset_flags)


def build_training(model_config, precision: str, strategy_name: str, batch_size: int,
                   data_config, num_cpu_devices: int = 0):
    """What a training run builds, without a model_dir: (strategy, StepFunctions, dataset).

    The dataset is the real input pipeline (augmentation, normalisation) distributed
    over the strategy's replicas.
    """
    from ranet import config as config_lib
    from ranet import data, optim, runtime
    from ranet.models import get_model
    from ranet.steps import StepFunctions

    rt = config_lib.RuntimeConfig(model_dir="unused", strategy=strategy_name,
                                  num_cpu_devices=num_cpu_devices, precision=precision)
    runtime.set_precision(precision)
    strategy = runtime.create_strategy(rt)
    splits = data.load_splits(data_config)
    input_fn = data.train_input_fn(splits.train, global_batch_size=batch_size, mean=splits.mean,
                                   std=splits.std, seed=0)
    with strategy.scope():
        model = get_model(model_config)
        optimizer = optim.create_optimizer(config_lib.OptimConfig(batch_size=batch_size), 100,
                                           precision)
        optimizer.build(model.trainable_variables)
        step_functions = StepFunctions(model, optimizer, strategy, global_batch_size=batch_size,
                                       weight_decay=1e-4,
                                       stop_on_nonfinite=precision != "mixed_float16")
    return strategy, step_functions, strategy.distribute_datasets_from_function(input_fn)


def synthetic_data(batch_size: int):
    from ranet import config as config_lib
    return config_lib.DataConfig(dataset="synthetic", validation_size=0,
                                 synthetic_train_size=max(2048, 4 * batch_size))
