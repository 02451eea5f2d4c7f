"""Prints a model's parameters and per-exit cumulative multiply-adds.

``python -m ranet.summary --preset=ranet_cifar10 [--json]``
"""

import json

from absl import flags

from ranet import cli


def define_flags(values: flags.FlagValues) -> None:
    cli.define_config_flags(values)
    flags.DEFINE_bool("json", False, 'Print {"model", "params", "exits": [{"exit", "macs"}]}.',
                      flag_values=values)


def main(values: flags.FlagValues) -> None:
    model_config = cli.model_config(values)
    # Imported here so that --help and flag errors answer without loading TensorFlow.
    from ranet import costs, models
    cost = costs.count(models.get_model(model_config))
    if values.json:
        print(json.dumps({"model": model_config.name, "params": cost.params,
                          "exits": [{"exit": e.exit, "macs": e.macs} for e in cost.exits]}))
    else:
        print(costs.format_table(cost))


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
