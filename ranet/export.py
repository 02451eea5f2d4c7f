"""Exports a trained model for serving: ``python -m ranet.export --model_dir=... --export_dir=...``.

Writes a SavedModel for TF Serving (``ranet.inference.serving.saved_model`` says what it holds).
"""

from absl import flags

from ranet import cli
from ranet.inference.serving.exporting import ExportOptions


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ExportOptions, values)


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ExportOptions, values)
    from ranet.inference.serving import saved_model
    return saved_model.export(options)


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
