"""Serves LiteRT exports over TF Serving's REST API: ``python -m ranet.serve --model=NAME=DIR``.

    python -m ranet.export --format=litert --model_dir=runs/ranet --export_dir=/exports/ranet
    python -m ranet.serve --model=ranet=/exports/ranet --port=8501
    curl -d '{"instances": [[[[0, 0, 0], ...]]]}' localhost:8501/v1/models/ranet:predict

Needs ai-edge-litert, aiohttp, prometheus-client and orjson (``pip install ranet[serve]``),
never TensorFlow. ``ranet.inference.serving.server`` holds the server, docs/serving.md the
endpoints, error codes, batching and what was measured.
"""

from absl import flags

from ranet import cli
from ranet.inference.serving.server import ServerOptions, serve


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ServerOptions, values)


def main(values: flags.FlagValues) -> None:
    serve(cli.from_flags(ServerOptions, values))


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
