"""Exports a trained model for serving: ``python -m ranet.export --model_dir=... --export_dir=...``.

``--format=saved_model`` (the default) writes a SavedModel for TF Serving; ``--format=litert``
one LiteRT file per stage and precision with a manifest, for CPUs and edge devices
(``ranet.inference.serving.saved_model`` and ``.litert`` say what they hold).
"""

from absl import flags

from ranet import cli
from ranet.inference.serving.exporting import ExportOptions


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ExportOptions, values)


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ExportOptions, values)
    from ranet.inference.serving import litert, saved_model
    return {"saved_model": saved_model.export, "litert": litert.export}[options.format](options)


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
