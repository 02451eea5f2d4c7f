"""Prints a model's parameters and per-exit cumulative multiply-adds.

``python -m ranet.summary --flagfile=flags/ranet_cifar10.cfg [--json]``
"""

import json
import os

from absl import flags

from ranet import cli

FLAGS = flags.FLAGS
cli.define_flags()
flags.DEFINE_bool("json", False, 'Print {"model", "params", "exits": [{"exit", "macs"}]}.')


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    model_config = cli.model_config()
    from ranet import costs
    from ranet.models import get_model
    cost = costs.count(get_model(model_config))
    if FLAGS.json:
        print(json.dumps({"model": model_config.name, "params": cost.params,
                          "exits": [{"exit": e.exit, "macs": e.macs} for e in cost.exits]}))
    else:
        print(costs.format_table(cost))


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cli.run(main)


if __name__ == "__main__":
    run()
