"""Imports a checkpoint trained by a reference (RANet-pytorch or MSDNet-PyTorch) as a ranet
model directory.

    python -m ranet.import_reference --checkpoint=model_best.pth.tar \\
        --flagfile=flags/ranet_cifar10.cfg --model_dir=runs/reference_cifar10
    python -m ranet.import_reference --checkpoint=msdnet-step=7-block=5.pth.tar \\
        --preset=msdnet_imagenet_step7 --model_dir=runs/msdnet_imagenet_step7

The architecture flags must be those the checkpoint was trained with (a preset or flagfile
states them); the reference's ``--data`` is ``--dataset`` here. PyTorch is not needed. The
model directory is then used as one ``ranet.train`` wrote: ``ranet.eval``, ``ranet.export``.
"""

from absl import flags

from ranet import cli
from ranet.errors import UsageError


def define_flags(values: flags.FlagValues) -> None:
    cli.define_config_flags(values)
    flags.DEFINE_string("checkpoint", None, "What the reference saved with torch.save: "
                        "main.py's checkpoint.pth.tar / model_best.pth.tar, or a bare state "
                        "dict. Zip (torch >= 1.6) and legacy files are read.", flag_values=values)


def main(values: flags.FlagValues) -> str:
    if not values.checkpoint:
        raise UsageError("--checkpoint is required: the file the reference saved.")
    config = cli.experiment_config(values)
    from ranet.reference import importing
    return importing.import_checkpoint(values.checkpoint, config)


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
