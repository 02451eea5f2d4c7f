"""The contest: RANet and its rivals trained alike, then evaluated side by side.

    python -m ranet.bench.head_to_head --data_dir=/path/to/data --test_size=10000 \\
        --time_budget=1h --runtimes=tf,litert,litert_int8 --out=contest

trains every model of the contest for the same budget with its own ``*_cifar10_1h_cpu``
preset, one after another, then runs ``ranet.eval`` on the test split, which evaluates every
model once and times it once per latency block (1: cold caches, 10: warm), and leaves each
block's report in ``<out>/report/latency_block<N>``, beside ``training_curves.png`` (every
model's validation accuracy against seconds of training, from its TensorBoard events):
its ``at_equal_accuracy`` section says how much faster each model with exits answers at each
baseline's accuracy, and ``at_equal_budget`` sets models with exits against each other.
``--epochs=E`` instead trains each model for E epochs of its converged recipe (``*_cifar10``
presets), the paper's contest on GPUs.

Resumable: every model trains in ``<out>/models/<model>`` and is marked trained when its
run ends; running the same command again skips what is trained, resumes an interrupted
run from its latest checkpoint (keeping its plan), and writes the reports still missing.
Each training and evaluation runs as its own process, as a user would start it: the
presets set their own thread pools, which TensorFlow fixes once per process.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from absl import flags, logging

from ranet import cli, config as config_lib, jsonio
from ranet.errors import UsageError
from ranet.inference import report
from ranet.inference.comparison import RUNTIMES, ComparisonOptions

# Model -> (preset for a time budget, preset for --epochs). The eval compares each model with
# several exits to each of the others.
CONTEST = {
    "ranet": ("ranet_cifar10_1h_cpu", "ranet_cifar10"),
    "msdnet": ("msdnet_cifar10_1h_cpu", "msdnet_cifar10"),
    "vgg16": ("vgg16_cifar10_1h_cpu", "vgg16_cifar10"),
    "resnet50": ("resnet50_cifar10_1h_cpu", "resnet50_cifar10"),
    "mobilenet_v2": ("mobilenet_v2_cifar10_1h_cpu", "mobilenet_v2_cifar10"),
}
SETTINGS_FILE = "head_to_head.json"
CURVES_FILE = "training_curves"
TRAINED_MARK = "head_to_head_trained.json"
MODELS_SUBDIR = "models"
REPORT_SUBDIR = "report"


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_string("out", None, "Folder of the contest: models, reports, settings.",
                        **define)
    flags.DEFINE_string("data_dir", None, "Folder holding cifar-10-batches-py.", **define)
    flags.DEFINE_list("models", list(CONTEST), "Models of the contest, trained in this order.",
                      **define)
    flags.DEFINE_string("time_budget", "1h", "Training time of EACH model (3m, 30m, 1h), "
                        "final evaluation and checkpoint included. On CIFAR-10 and a 2-core CPU "
                        "the shortest that trains every preset is 3m: a shorter one leaves no "
                        "room for a step beside the set-up and the final evaluation, and the "
                        "training refuses it after its set-up.", **define)
    flags.DEFINE_integer("epochs", 0, "Instead of --time_budget: train each model for this "
                         "many epochs of its converged recipe (0: use --time_budget).",
                         lower_bound=0, **define)
    flags.DEFINE_integer("test_size", 0, "Training images held out as the test split, for a "
                         "folder without CIFAR's test file (the shared copy: 10000).",
                         lower_bound=0, **define)
    flags.DEFINE_list("runtimes", list(RUNTIMES),
                      "Runtimes of the evaluation (ranet.eval --runtimes).", **define)
    flags.DEFINE_list("latency_blocks", ["1", "10"], "One report per latency block "
                      "(ranet.eval --latency_block): 1 cold, 10 warm.", **define)
    flags.DEFINE_multi_string("train_flag", [], "A flag passed on to every training, after "
                              "the preset (repeat it).", **define)
    flags.DEFINE_multi_string("eval_flag", [], "A flag passed on to every evaluation "
                              "(repeat it).", **define)


@dataclasses.dataclass(frozen=True)
class Contest:
    """What decides the models trained; a resumed contest must keep it."""
    models: tuple
    time_budget: Optional[str]
    epochs: int
    test_size: int
    train_flags: tuple

    def preset(self, model: str) -> str:
        return CONTEST[model][1 if self.epochs else 0]

    def length_flag(self) -> str:
        return f"--epochs={self.epochs}" if self.epochs else f"--time_budget={self.time_budget}"

    @property
    def budget_seconds(self) -> Optional[float]:
        return None if self.epochs else config_lib.parse_duration(self.time_budget,
                                                                  "time_budget")


def contest_from_flags(values: flags.FlagValues) -> Contest:
    unknown = [m for m in values.models if m not in CONTEST]
    if unknown or not values.models or len(set(values.models)) != len(values.models):
        raise UsageError(f"--models takes distinct names among {', '.join(CONTEST)}. "
                         f"Received: --models={','.join(values.models)}")
    if not values.epochs:  # a malformed --time_budget fails here, before any work
        config_lib.parse_duration(values.time_budget, "time_budget")
    return Contest(models=tuple(values.models),
                   time_budget=None if values.epochs else values.time_budget,
                   epochs=values.epochs, test_size=values.test_size,
                   train_flags=tuple(values.train_flag))


def eval_options(values: flags.FlagValues, model_dirs: Sequence[str]) -> ComparisonOptions:
    """The options of the contest's ``ranet.eval``, built and checked as ranet.eval builds
    them, so that a request it would refuse fails before any model trains."""
    parsed = flags.FlagValues()
    cli.define_fields(ComparisonOptions, parsed)
    arguments = [*[f"--model_dir={d}" for d in model_dirs], "--split=test",
                 f"--runtimes={','.join(values.runtimes)}",
                 f"--latency_block={','.join(values.latency_blocks)}",
                 *([f"--data_dir={values.data_dir}"] if values.data_dir else []),
                 *values.eval_flag]
    try:
        parsed(["ranet.eval", *arguments])
    except flags.Error as error:
        raise UsageError(f"the evaluation's flags ({' '.join(arguments)}) are not ranet.eval's: "
                         f"{error}") from None
    return cli.from_flags(ComparisonOptions, parsed)


def _check_settings(out: str, contest: Contest) -> None:
    """Writes the contest's settings, or refuses a resume that would change them."""
    path = os.path.join(out, SETTINGS_FILE)
    settings = json.loads(jsonio.dumps(dataclasses.asdict(contest)))
    if os.path.exists(path):
        previous = jsonio.read(path, f"Delete {path} or use another --out.")
        changed = {k: (previous.get(k), v) for k, v in settings.items()
                   if k != "models" and previous.get(k) != v}
        if changed:
            raise UsageError(
                f"{out} holds a contest with other settings ({', '.join(changed)}: was "
                f"{', '.join(str(old) for old, _ in changed.values())}); its models were "
                "trained under them. Use another --out, or the same settings to resume.")
    jsonio.write(path, settings)


def _trained(model_dir: str) -> bool:
    return os.path.exists(os.path.join(model_dir, TRAINED_MARK))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


# What TensorFlow's C++ side prints as every process starts, before absl's logging is set up
# (so no log level hides it): the contest prints it once, not once per training.
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|port\.cc:\d+\] oneDNN custom operations"
    r"|cudart_stub\.cc|cpu_feature_guard\.cc|^To enable the following instructions"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit")


def _run(command: List[str], what: str) -> None:
    """Runs a binary of this package with its output streamed (less TensorFlow's start-up
    lines); stops the contest if it fails."""
    logging.info("head_to_head: %s: %s", what, " ".join(command))
    child = subprocess.Popen([sys.executable, "-m", *command], stderr=subprocess.PIPE,
                             text=True, bufsize=1)
    for line in child.stderr:
        if not _STARTUP_NOISE.search(line):
            sys.stderr.write(line)
    status = child.wait()
    if status != 0:
        cli.fail(f"{what} failed (exit status {status}); its output is above. Fix the cause "
                 "and run the same command again: trained models are kept and an interrupted "
                 "training resumes.")


def train(out: str, contest: Contest, data_dir: Optional[str]) -> Dict[str, str]:
    """Trains every model of ``contest`` not yet trained; returns the model directories."""
    model_dirs = {m: os.path.join(out, MODELS_SUBDIR, m) for m in contest.models}
    for index, model in enumerate(contest.models, start=1):
        model_dir = model_dirs[model]
        if _trained(model_dir):
            logging.info("head_to_head: [%d/%d] %s is trained (%s); skipped", index,
                         len(contest.models), model, model_dir)
            continue
        left = [m for m in contest.models[index - 1:] if not _trained(model_dirs[m])]
        logging.info("head_to_head: [%d/%d] training %s (--preset=%s %s)%s", index,
                     len(contest.models), model, contest.preset(model), contest.length_flag(),
                     "" if contest.budget_seconds is None else
                     f"; about {_duration(len(left) * contest.budget_seconds)} of training "
                     "left in the contest, then the evaluation")
        command = ["ranet.train", f"--preset={contest.preset(model)}", f"--model_dir={model_dir}",
                   contest.length_flag(), *contest.train_flags]
        if data_dir:
            command.insert(2, f"--data_dir={data_dir}")
        if contest.test_size:
            command.insert(2, f"--test_size={contest.test_size}")
        started = time.monotonic()
        _run(command, f"training {model}")
        jsonio.write(os.path.join(model_dir, TRAINED_MARK),
                            {"seconds_this_call": time.monotonic() - started})
    return model_dirs


def evaluate(out: str, options: ComparisonOptions) -> List[str]:
    """One ``ranet.eval`` on the test split: every model evaluated once, timed once per
    latency block; returns the report folders."""
    report_dir = os.path.join(out, REPORT_SUBDIR)
    reports = list(report.report_dirs(report_dir, options.latency_block).values())
    if all(os.path.exists(os.path.join(r, report.REPORT_JSON)) for r in reports):
        logging.info("head_to_head: %s is written; skipped", report_dir)
        return reports
    _run(["ranet.eval", *cli.to_flags(options), f"--report_dir={report_dir}"],
         "the evaluation")
    return reports


def validation_curves(model_dir: str) -> Dict[str, List[List[float]]]:
    """{exit tag: [[seconds since the run's first event, accuracy], ...]} of a model's
    validation events (a resumed run's pause counts as time)."""
    import glob

    import tensorflow as tf
    events = [(event.wall_time, value)
              for subdir in ("train", "validation")
              for path in sorted(glob.glob(os.path.join(model_dir, subdir, "events.out.*")))
              for event in map(tf.compat.v1.Event.FromString,
                               tf.data.TFRecordDataset(path).as_numpy_iterator())
              for value in (event.summary.value if subdir == "validation" else [None])]
    if not events:
        return {}
    start = min(wall_time for wall_time, _ in events)
    curves = {}
    for wall_time, value in sorted(events, key=lambda e: e[0]):
        if value is not None and value.tag.startswith("accuracy/exit_"):
            accuracy = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                else value.simple_value
            curves.setdefault(value.tag, []).append([wall_time - start, accuracy])
    return curves


def plot_training_curves(out: str, model_dirs: Dict[str, str]) -> List[str]:
    """``<out>/report/training_curves.{png,json}``: each model's first and last exit on
    validation against minutes of training, so that a reader sees where the curves cross."""
    curves = {model: validation_curves(directory) for model, directory in model_dirs.items()}
    curves = {model: c for model, c in curves.items() if c}
    if not curves:
        return []
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (model, by_exit) in enumerate(curves.items()):
        tags = sorted(by_exit, key=lambda tag: int(tag.rsplit("_", 1)[1]))
        for tag, style in ((tags[-1], "-"), (tags[0], ":")) if len(tags) > 1 else ((tags[0], "-"),):
            points = np.array(by_exit[tag])
            label = model if len(tags) == 1 else f"{model} {tag.split('/')[1].replace('_', ' ')}"
            axes.plot(points[:, 0] / 60, points[:, 1] * 100, style, marker=".",
                      color=f"C{index % 10}", label=label)
    axes.set_xlabel("minutes of training")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("Validation accuracy during training (first exit dotted)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    folder = os.path.join(out, REPORT_SUBDIR)
    os.makedirs(folder, exist_ok=True)
    png = os.path.join(folder, f"{CURVES_FILE}.png")
    figure.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return [png, jsonio.write(os.path.join(folder, f"{CURVES_FILE}.json"), curves)]


def main(values: flags.FlagValues) -> List[str]:
    if not values.out:
        raise UsageError("pass --out=/folder/of/the/contest")
    contest = contest_from_flags(values)
    options = eval_options(values, [os.path.join(values.out, MODELS_SUBDIR, m)
                                    for m in contest.models])
    os.makedirs(values.out, exist_ok=True)
    _check_settings(values.out, contest)
    model_dirs = train(values.out, contest, values.data_dir)
    for path in plot_training_curves(values.out, model_dirs):
        logging.info("head_to_head: wrote %s", path)
    reports = evaluate(values.out, options)
    for report_dir in reports:
        logging.info("head_to_head: report in %s", os.path.join(report_dir, "report.md"))
    return reports


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
