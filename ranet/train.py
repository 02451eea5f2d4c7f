"""Trains RANet or a baseline: ``python -m ranet.train --flagfile=flags/ranet_cifar10.cfg``.

Running the same command again resumes from the latest checkpoint in --model_dir.
"""

import os

from absl import flags, logging

from ranet import cli

FLAGS = flags.FLAGS
cli.define_flags()


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.experiment_config()
    # Imported here so that --help and flag errors answer without loading TensorFlow.
    from ranet import trainer
    logging.set_verbosity(logging.INFO)
    result = trainer.train_and_evaluate(config, flags_text=FLAGS.flags_into_string())
    logging.info("done at step %d: validation %s", result["step"], result["validation"])


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)


if __name__ == "__main__":
    run()
