"""ranet: RANet (Resolution Adaptive Networks) and its baselines in TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

SERVE = ["aiohttp>=3.9,<4", "prometheus-client>=0.17", "orjson>=3.8"]

setup(
    name="ranet",
    version="0.1.0",
    description="Train, evaluate and serve RANet with real early exit, against VGG16, ResNet50 and MobileNetV2.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ranet", "ranet.*", "launch", "launch.*"]) + ["ranet.presets"],
    # The flagfiles in flags/ install as ranet.presets, so --preset=<name> works from any
    # installation; the launchers' scripts and manifests travel with launch/.
    package_dir={"ranet.presets": "flags"},
    package_data={"ranet.presets": ["*.cfg"], "launch": ["*.sbatch", "*.md", "k8s/*.yaml"]},
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.10,<4",
        "tensorboard>=2.21,<3",  # TF 2.21 no longer installs it; tf.summary needs it.
        "absl-py>=2.1",
        "numpy>=1.26",
        # The LiteRT interpreter (XNNPACK) that serves the --format=litert export; TF's own
        # tf.lite.Interpreter is deprecated. Serving needs it and numpy, not TensorFlow.
        "ai-edge-litert>=2.3,<3",
    ],
    extras_require={
        "plots": ["matplotlib>=3.8"],  # the eval binary's PNG plots
        # ranet.serve: TF Serving's REST API over the LiteRT export, without TensorFlow.
        # orjson parses a request's pixel lists 6x faster than json (docs/serving.md).
        "serve": SERVE,
        # pyyaml: tests/end_to_end/test_launch.py checks the Kubernetes manifest; pytest-xdist
        # runs the test files in as many processes as there are cores.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "matplotlib>=3.8", "pyyaml>=6", *SERVE],
    },
    entry_points={
        "console_scripts": [
            "ranet-train=ranet.train:run",
            "ranet-summary=ranet.summary:run",
            "ranet-eval=ranet.eval:run",
            "ranet-export=ranet.export:run",
            "ranet-serve=ranet.serve:run",
            "ranet-import-reference=ranet.import_reference:run",
        ],
    },
)
