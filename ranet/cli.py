"""The command line: flags generated from the config fields, presets by name, one way to run a binary.

* ``define_config_flags`` defines one flag per field of ``ranet.config`` that carries
  ``config.flag(...)`` metadata, and ``experiment_config`` turns parsed values back into
  the frozen configs: each field is written once, in ``ranet.config``. ``ranet.train`` and
  ``ranet.summary`` take these flags, so one flagfile (``flags/*.cfg``) serves both.
* Presets: in a binary that takes the config flags, ``--preset=ranet_cifar10`` reads the
  flagfile of that name installed with the package (``flags/`` in the source tree), as
  ``--flagfile=flags/ranet_cifar10.cfg`` does from a checkout. Flags after it override it.
* ``run(main, define_flags)`` is every binary's entry point: one log level, the check for
  stray arguments, and ``USAGE_ERRORS`` (``UsageError``: what the user can fix) turned into
  ``error: <what and how to fix>`` with exit status 2 and no traceback; any other error, a
  plain ``ValueError`` from a bug included, keeps its traceback. ``call`` runs a binary
  in-process on a fresh set of flag values, for tests.

Library modules never read flags.
"""

import dataclasses
import importlib.resources
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from absl import app, flags, logging

from ranet import config as config_lib
from ranet.errors import UsageError

FLAGS = flags.FLAGS
PRESETS_PACKAGE = "ranet.presets"
PRESET_SUFFIX = ".cfg"
# One TensorFlow C++ log level for every binary: warnings and errors only.
TF_LOG_LEVEL = "2"
# What the user can fix (a flag, a file or folder they named, a training that diverged: the
# subclasses in ranet.errors): a message, not a traceback. Anything else, a FileNotFoundError
# or FloatingPointError raised deep in a run included, keeps its traceback.
USAGE_ERRORS = (UsageError,)

_CONFIG_SECTIONS = (config_lib.DataConfig, config_lib.ModelConfig, config_lib.OptimConfig,
                    config_lib.RuntimeConfig)


# --------------------------------------------------------------------------------------------
# Flags generated from config fields.

def _flag_fields(cls):
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata["name"] or field.name


def _kind(field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta["kind"]:
        return meta["kind"]
    if meta["choices"]:
        return "enum"
    for python_type, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(field.default, python_type):
            return kind
    raise TypeError(f"config field {field.name} needs kind= in its flag(): its default "
                    f"{field.default!r} does not say how to parse it")


def define_fields(cls, values: flags.FlagValues) -> None:
    """Defines one flag per flag field of the dataclass ``cls`` (skips those defined already)."""
    for field in _flag_fields(cls):
        name, meta, kind = _flag_name(field), field.metadata, _kind(field)
        if name in values:
            continue
        default = meta["unset"] if field.default is None else field.default
        common = {"flag_values": values}
        if kind == "bool":
            flags.DEFINE_bool(name, default, meta["help"], **common)
        elif kind == "int":
            flags.DEFINE_integer(name, default, meta["help"], lower_bound=meta["lower_bound"],
                                 **common)
        elif kind == "float":
            flags.DEFINE_float(name, default, meta["help"], lower_bound=meta["lower_bound"],
                               **common)
        elif kind == "str":
            flags.DEFINE_string(name, default, meta["help"], **common)
        elif kind == "enum":
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"], **common)
        elif kind == "ints":
            flags.DEFINE_string(name, "-".join(map(str, default)), meta["help"], **common)
        elif kind == "floats":
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default],
                              meta["help"], **common)
        elif kind == "strings":
            flags.DEFINE_multi_string(name, list(default), meta["help"], **common)
        elif kind == "list":
            flags.DEFINE_list(name, list(default), meta["help"], **common)
        else:
            raise TypeError(f"unknown flag kind {kind!r} of config field {field.name}")


def _dash_ints(text: str, name: str) -> Tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("-"))
    except ValueError:
        raise UsageError(f"--{name} takes integers joined by '-', e.g. 4-2-1. "
                         f"Received: --{name}={text}") from None


def _floats(items: Sequence[str], name: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise UsageError(f"--{name} takes comma-separated numbers. "
                         f"Received: --{name}={','.join(items)}") from None


def _field_value(field: dataclasses.Field, values: flags.FlagValues):
    name, meta, kind = _flag_name(field), field.metadata, _kind(field)
    value = values[name].value
    if meta["unset"] is not None:
        if kind == "int" and value is not None and value < 0:
            raise UsageError(f"{name} must be >= 0 ({meta['unset']}: unset). "
                             f"Received: --{name}={value}")
        if value == meta["unset"]:
            return None
    if value is None:
        return None
    if kind == "ints":
        return _dash_ints(value, name)
    if kind == "floats":
        return _floats(value, name)
    if kind in ("strings", "list"):
        return tuple(value)
    return value


def to_flags(instance) -> List[str]:
    """The command-line flags that make ``instance`` (a dataclass of flag fields) again."""
    arguments = []
    for field in _flag_fields(type(instance)):
        name, kind = _flag_name(field), _kind(field)
        value = getattr(instance, field.name)
        if value is None:
            value = field.metadata["unset"]
            if value is None:
                continue
        if kind == "bool":
            arguments.append(f"--{'' if value else 'no'}{name}")
        elif kind == "strings":
            arguments += [f"--{name}={item}" for item in value]
        elif kind in ("ints", "floats", "list"):
            arguments.append(f"--{name}={('-' if kind == 'ints' else ',').join(map(str, value))}")
        else:
            arguments.append(f"--{name}={value}")
    return arguments


def from_flags(cls, values: flags.FlagValues, **derived):
    """An instance of the dataclass ``cls`` from parsed flags; ``derived`` fills the rest."""
    return cls(**{field.name: _field_value(field, values) for field in _flag_fields(cls)},
               **derived)


def _config_flag_names() -> List[str]:
    return sorted(_flag_name(field) for cls in _CONFIG_SECTIONS for field in _flag_fields(cls))


def takes_config_flags(values: flags.FlagValues) -> bool:
    """Whether a binary's flags are the config flags (and so its ``--preset`` names a preset)."""
    return all(name in values for name in _config_flag_names())


def config_flags_text(values: flags.FlagValues) -> str:
    """The config flags' values, one ``--name=value`` per line: a flagfile of the run."""
    return "".join(f"{values[name].serialize()}\n" for name in _config_flag_names())


def define_config_flags(values: flags.FlagValues = FLAGS) -> None:
    """The flags of every config field, and ``--preset``; a second call defines nothing new."""
    for cls in _CONFIG_SECTIONS:
        define_fields(cls, values)
    if "preset" not in values:
        flags.DEFINE_string("preset", None, "A preset of flags by name (the flagfiles in "
                            f"flags/: {', '.join(preset_names()) or 'none installed'}); flags "
                            "after it override it.", flag_values=values)


def data_config(values: flags.FlagValues = FLAGS) -> config_lib.DataConfig:
    return from_flags(config_lib.DataConfig, values)


def model_config(values: flags.FlagValues = FLAGS) -> config_lib.ModelConfig:
    data = data_config(values)
    return from_flags(config_lib.ModelConfig, values, num_classes=data.num_classes,
                      image_size=data.image_size, imagenet=data.dataset == "imagenet")


def experiment_config(values: flags.FlagValues = FLAGS) -> config_lib.ExperimentConfig:
    return config_lib.ExperimentConfig(
        data=data_config(values), model=model_config(values),
        optim=from_flags(config_lib.OptimConfig, values),
        runtime=from_flags(config_lib.RuntimeConfig, values))


# --------------------------------------------------------------------------------------------
# Presets.

def _presets_folder():
    try:
        return importlib.resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:
        return None


def preset_names() -> List[str]:
    """The presets installed with the package, sorted."""
    folder = _presets_folder()
    if folder is None:
        return []
    return sorted(entry.name[:-len(PRESET_SUFFIX)] for entry in folder.iterdir()
                  if entry.name.endswith(PRESET_SUFFIX))


def preset_path(name: str) -> str:
    """The flagfile of preset ``name``."""
    folder = _presets_folder()
    if folder is None:
        raise UsageError(f"no presets are installed ({PRESETS_PACKAGE} is missing): reinstall "
                         "ranet with pip install, or pass --flagfile=flags/<name>.cfg from a "
                         f"checkout. Received: --preset={name}")
    path = folder / f"{name}{PRESET_SUFFIX}"
    if not path.is_file():
        raise UsageError(f"preset must be one of {', '.join(preset_names())}. "
                         f"Received: preset={name!r}")
    return str(path)


def preset_config(name: str) -> config_lib.ExperimentConfig:
    """The configuration a preset describes, parsed apart from any binary's flags."""
    values = flags.FlagValues()
    define_config_flags(values)
    values(["preset", f"--flagfile={preset_path(name)}"])
    return experiment_config(values)


def expand_presets(argv: Sequence[str]) -> List[str]:
    """``--preset=NAME`` (or ``--preset NAME``) becomes ``--flagfile=<its file>``, in place."""
    expanded, position = [], 0
    argv = list(argv)
    while position < len(argv):
        argument = argv[position]
        name = None
        if argument.startswith(("--preset=", "-preset=")):
            name = argument.split("=", 1)[1]
        elif argument in ("--preset", "-preset") and position + 1 < len(argv):
            position += 1
            name = argv[position]
        expanded.append(argument if name is None else f"--flagfile={preset_path(name)}")
        position += 1
    return expanded


# --------------------------------------------------------------------------------------------
# Running binaries.

def fail(message: str) -> None:
    """Ends the binary with a one-line reason and exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_no_arguments(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run(main: Callable[[flags.FlagValues], Any],
        define_flags: Callable[[flags.FlagValues], None]) -> None:
    """Runs a binary as a command: ``main(flag_values)`` after absl parsed its flags."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    define_flags(FLAGS)

    def guarded(argv):
        try:
            _check_no_arguments(argv)
            logging.set_verbosity(logging.INFO)
            main(FLAGS)
        except USAGE_ERRORS as error:
            fail(str(error))

    argv = sys.argv
    if takes_config_flags(FLAGS):
        try:
            argv = expand_presets(argv)
        except UsageError as error:
            fail(str(error))
    app.run(guarded, argv=argv)


def call(main: Callable[[flags.FlagValues], Any],
         define_flags: Callable[[flags.FlagValues], None], args: Sequence[str],
         program: Optional[str] = None) -> Any:
    """Runs a binary in-process on fresh flag values; errors propagate as exceptions."""
    values = flags.FlagValues()
    define_flags(values)
    if takes_config_flags(values):
        args = expand_presets(args)
    remaining = values([program or main.__module__, *args])
    _check_no_arguments(remaining)
    logging.set_verbosity(logging.INFO)
    return main(values)
