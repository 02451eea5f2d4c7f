"""ranet.cli: flags generated from the config fields, presets by name, the binaries' wrapper."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from helpers import REPO_ROOT, SMOKE, python, tail
from ranet import cli
from ranet import config as config_lib
from ranet.errors import UsageError


def _parse(*args) -> flags.FlagValues:
    values = flags.FlagValues()
    cli.define_config_flags(values)
    values(["test", *cli.expand_presets(args)])
    return values


def test_every_flag_field_becomes_a_flag_with_its_default():
    values = _parse()
    defaults = config_lib.ExperimentConfig(
        data=config_lib.DataConfig(), model=config_lib.ModelConfig(),
        optim=config_lib.OptimConfig(), runtime=config_lib.RuntimeConfig())
    assert cli.experiment_config(values) == defaults
    assert values["scale_list"].value == "1-2-3" and values["model"].value == "ranet"
    assert values["train_steps"].value == 0 and values["pretrained"].value == "none"
    assert values["exit_weights"].value is None
    # Fields that are not flags (derived from the dataset) are not defined.
    assert "num_classes" not in values and "image_size" not in values


def test_flags_convert_to_the_config_types():
    config = cli.experiment_config(_parse(
        "--dataset=cifar100", "--scale_list=1-2-3-3", "--growth_factors=4-2-1-1",
        "--bottleneck_factors=4-2-1-1", "--exit_weights=1,0.5,2,1,1,1,1,1", "--train_steps=7",
        "--pretrained=none", "--decay_fractions=0.3,0.6", "--stop_at_step=0"))
    assert config.model.scale_list == (1, 2, 3, 3) and config.model.num_classes == 100
    assert config.optim.exit_weights == (1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert config.optim.train_steps == 7 and config.optim.decay_fractions == (0.3, 0.6)
    assert config.model.pretrained is None and config.runtime.stop_at_step is None


@pytest.mark.parametrize("args, message", [
    (["--exit_weights=1,x"], r"--exit_weights takes comma-separated numbers.*1,x"),
    (["--growth_factors=4-2-"], r"--growth_factors takes integers joined by '-'"),
    (["--stop_at_step=-1"], r"stop_at_step must be >= 0 \(0: unset\)"),
])
def test_malformed_values_name_the_flag(args, message):
    with pytest.raises(ValueError, match=message):
        cli.experiment_config(_parse(*args))


def test_a_preset_by_name_is_its_flagfile_and_later_flags_override_it():
    assert cli.preset_config("ranet_smoke") == SMOKE
    config = cli.experiment_config(_parse("--preset", "ranet_smoke", "--batch_size=16"))
    assert config == dataclasses.replace(SMOKE, optim=dataclasses.replace(SMOKE.optim,
                                                                         batch_size=16))
    assert "ranet_smoke" in cli.preset_names()


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"preset must be one of .*ranet_cifar10.*'nope'"):
        cli.expand_presets(["--preset=nope"])


def test_the_recorded_flags_are_only_the_config_flags():
    values = _parse("--preset=ranet_smoke")
    lines = cli.config_flags_text(values).splitlines()
    assert "--scale_list=1-2-3" in lines and "--nosync_batch_norm" in lines
    assert not [line for line in lines if line.startswith(("--preset", "--flagfile", "--help"))]


def test_only_binaries_that_take_the_config_flags_expand_presets():
    def define(values):
        flags.DEFINE_string("preset", None, "A benchmark's own flag of the same name.",
                            flag_values=values)

    assert cli.call(lambda values: values.preset, define, ["--preset=ranet_smoke"]) == "ranet_smoke"
    assert cli.call(lambda values: cli.experiment_config(values), cli.define_config_flags,
                    ["--preset=ranet_smoke"]) == SMOKE


@pytest.mark.parametrize("error, usage", [
    ("UsageError", True), ("MissingPathError", True), ("DivergedError", True),
    ("ValueError", False), ("FileNotFoundError", False), ("FloatingPointError", False)])
def test_run_ends_a_usage_error_in_one_line_but_anything_else_keeps_its_traceback(error, usage):
    """What the user can fix (``UsageError`` and its subclasses) is ``error: ...`` and status 2;
    a plain ``ValueError``, ``FileNotFoundError`` or ``FloatingPointError`` raised deep in a run
    keeps its traceback, which ``cli.run`` must not swallow into one line."""
    assert issubclass(UsageError, ValueError) and ValueError not in cli.USAGE_ERRORS
    result = python("-c", "from ranet import cli\nfrom ranet.errors import *\n"
                    f"def main(values):\n    raise {error}('--answer must be 42. Received: "
                    "--answer=41')\ncli.run(main, lambda values: None)\n", timeout=60)
    if usage:
        assert result.returncode == 2, tail(result)
        assert "error: --answer must be 42. Received: --answer=41" in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    else:
        assert result.returncode == 1, tail(result)
        assert "Traceback" in result.stderr and f"{error}: --answer must be 42" in result.stderr
        assert not any(line.startswith("error: ") for line in result.stderr.splitlines())


def test_a_non_editable_install_carries_the_presets_and_the_launchers(tmp_path):
    """``pip install .`` (not -e) ships flags/ as ranet.presets and launch/ with its files."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "ranet", "flags", "launch"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    installed = tmp_path / "installed"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--target", str(installed), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = ("from ranet import cli; import launch.local, ranet; "
             "print(ranet.__file__); print(cli.preset_path('ranet_smoke')); "
             "print(launch.local.__file__)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(installed)})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert all(line.startswith(str(installed)) for line in lines), lines
    assert lines[1].endswith("ranet/presets/ranet_smoke.cfg")
    assert (installed / "launch" / "slurm.sbatch").is_file()
    assert (installed / "launch" / "k8s" / "tfjob.yaml").is_file()


def test_to_flags_makes_the_same_options_again():
    from ranet.inference.comparison import ComparisonOptions
    options = ComparisonOptions(model_dir=("/a", "/b"), budget_mflops=(20.0, 40.0), xla=True,
                                threshold=0.85, runtimes=("tf", "litert"))
    values = flags.FlagValues()
    cli.define_fields(ComparisonOptions, values)
    values(["test", *cli.to_flags(options)])
    assert cli.from_flags(ComparisonOptions, values) == options
    assert cli.to_flags(SMOKE.optim)[:2] == ["--batch_size=32", "--epochs=300"]
