"""Trains RANet or a baseline: ``python -m ranet.train --preset=ranet_cifar10 --data_dir=...``.

``--flagfile=flags/ranet_cifar10.cfg`` does the same from a checkout. Running the same command
again resumes from the latest checkpoint in --model_dir.
"""

from absl import flags, logging

from ranet import cli


def define_flags(values: flags.FlagValues) -> None:
    cli.define_config_flags(values)


def main(values: flags.FlagValues) -> dict:
    config = cli.experiment_config(values)
    # Imported here so that --help and flag errors answer without loading TensorFlow.
    from ranet import training
    result = training.train_and_evaluate(config, flags_text=cli.config_flags_text(values))
    logging.info("done at step %d: validation %s", result["step"], result["validation"])
    return result


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
