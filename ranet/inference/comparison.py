"""Several trained models measured alike, in one process: what ``ranet.eval`` and
``ranet.bench.inference`` both do.

For every model and every runtime (``tf``: TensorFlow graphs; ``litert`` / ``litert_int8``: the
LiteRT stage files of the serving export, float32 / int8, converted here): accuracy of every
exit and calibrated operating points on the same images (``evaluation``), each runtime's
thresholds calibrated on its own outputs; then batch-1 latency of every path of every model
and runtime timed interleaved, and batched throughput (``latency``). Every path takes raw
pixels, as a served request does. ``ComparisonOptions`` is also the flag set of both binaries.
"""

import dataclasses
import functools
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from ranet import config as config_lib
from ranet import devices
from ranet.config import flag, require
from ranet.data import report_images
from ranet.data.report_images import EvaluationImages
from ranet.inference import (adaptive, calibration, equal_accuracy, equal_budget, evaluation,
                             latency, points)
from ranet.inference.equal_accuracy import Match, Pair
from ranet.inference.points import Kind, PointId
from ranet.inference.serving import litert, litert_runtime
from ranet.training import model_dir as model_dir_lib
from ranet.training.model_dir import CHECKPOINT_CHOICES, LoadedModel

SPLITS = ("test", "validation")
TF = "tf"
# Runtime name -> LiteRT precision (None: TensorFlow).
RUNTIMES = {TF: None, "litert": "fp32", "litert_int8": "int8"}


@dataclasses.dataclass(frozen=True)
class ComparisonOptions:
    """Which models, which images, which operating points, and how they are timed."""
    model_dir: tuple = flag((), "A trained model directory; repeat the flag to evaluate RANet "
                            "and the baselines together.", kind="strings")
    split: str = flag("test", "Images to report on. validation: thresholds are calibrated on "
                      "one half of the validation split and reported on the other.",
                      choices=SPLITS)
    data_dir: Optional[str] = flag(None, "Overrides the data location saved with the models.",
                                   kind="str")
    checkpoint: str = flag("best", "best: the best checkpoint on validation (falls back to "
                           "latest).", choices=CHECKPOINT_CHOICES)
    precision: str = flag("fp32", "Numeric precision of inference.",
                          choices=config_lib.PRECISIONS)
    budget_mflops: tuple = flag((), "Compute budgets (million multiply-adds per image); each "
                                "maps to the most accurate calibrated point within it.",
                                kind="floats")
    threshold: Optional[float] = flag(None, "Also report the seed's single fixed threshold "
                                      "(e.g. 0.85).", kind="float")
    confidence: str = flag(adaptive.MAX_SOFTMAX, "Exit confidence.",
                           choices=adaptive.CONFIDENCE_KINDS)
    seed: int = flag(0, "Seed of the validation halves (--split=validation) and of the "
                     "samples of --max_images.")
    max_images: int = flag(0, "Read at most this many images of each split, a class-balanced "
                           "seeded sample (0: all). They are held in memory: ImageNet's take "
                           "150 KB each.", lower_bound=0)
    xla: bool = flag(False, "XLA-compile the batch-1 paths (full and adaptive) of every model "
                     "alike (on a CPU it speeds RANet up and slows VGG16 down: BUILD_NOTES.md).")
    intra_op_threads: int = flag(0, "Threads one op may use; 0: every core. 1 suits batch-1 "
                                 "latency of small networks (BUILD_NOTES.md).", lower_bound=0)
    inter_op_threads: int = flag(0, "Ops run at once; 0: every core.", lower_bound=0)
    latency_images: int = flag(300, "Images timed one by one for batch-1 latency.")
    latency_block: tuple = flag(
        ("1",), "Images each path answers in a row before the next path runs. 1: every call "
        "follows other models' calls, caches cold (a host serving many models); 10: most "
        "calls find their own weights cached (a host serving one). Several (1,10): the "
        "models are evaluated once and timed once per block, one report each.", kind="list")
    warmup: int = flag(10, "Untimed calls per path before timing.")
    batch_size: int = flag(256, "Batch size of inference and of the throughput test.")
    throughput_images: int = flag(2048, "Images per throughput measurement.")
    runtimes: tuple = flag(
        (TF,), "Runtimes to evaluate and time every model on, interleaved, in any order: tf "
        "(TensorFlow, always included), litert (the LiteRT files ranet.export writes, "
        "float32), litert_int8 (int8).", kind="list")
    litert_threads: str = flag(
        litert_runtime.AUTO_THREADS, "XNNPACK threads of each LiteRT interpreter: auto (each "
        "file, stage, one-graph file or baseline, at the count that runs it fastest here, "
        "timed when it loads), or a count (0: every core).")
    representative_images: int = flag(
        report_images.REPRESENTATIVE_IMAGES, "LiteRT int8: training images that calibrate the "
        "quantisation ranges, chosen as ranet.export chooses them, so that the int8 files "
        "measured are the files it writes with the same flag.", lower_bound=1)

    def __post_init__(self):
        require(bool(self.model_dir),
                "pass at least one --model_dir (repeat it to compare models)")
        require(all(b > 0 for b in self.budget_mflops),
                f"--budget_mflops must be positive. Received: {list(self.budget_mflops)}")
        require(self.latency_images > 0 and self.batch_size > 0 and self.throughput_images > 0,
                "--latency_images, --batch_size and --throughput_images must be positive. "
                f"Received: {self.latency_images}, {self.batch_size}, {self.throughput_images}")
        require(self.warmup >= 0, f"--warmup must be >= 0. Received: {self.warmup}")
        try:
            blocks = tuple(int(b) for b in self.latency_block)
        except ValueError:
            blocks = ()
        require(bool(blocks) and min(blocks) >= 1 and len(set(blocks)) == len(blocks),
                "--latency_block takes distinct positive integers, e.g. 1 or 1,10. Received: "
                f"--latency_block={','.join(map(str, self.latency_block))}")
        object.__setattr__(self, "latency_block", blocks)
        require(self.litert_threads == litert_runtime.AUTO_THREADS
                or (self.litert_threads.isdigit()),
                "--litert_threads takes a count of threads (0: every core) or auto. "
                f"Received: --litert_threads={self.litert_threads}")
        require(set(self.runtimes) <= set(RUNTIMES) and TF in self.runtimes
                and len(set(self.runtimes)) == len(self.runtimes),
                f"runtimes must include tf and be distinct names among {', '.join(RUNTIMES)}. "
                f"Received: runtimes={','.join(self.runtimes)}")
        # One canonical order, so that the order of the flag changes nothing in the report.
        object.__setattr__(self, "runtimes", tuple(r for r in RUNTIMES if r in self.runtimes))


def litert_threads(options: ComparisonOptions) -> litert_runtime.Threads:
    """--litert_threads as the LiteRT runtime takes it: a count (0: every core) or auto."""
    if options.litert_threads == litert_runtime.AUTO_THREADS:
        return litert_runtime.AUTO_THREADS
    return int(options.litert_threads) or os.cpu_count()


@dataclasses.dataclass(frozen=True, eq=False)
class ModelResult:
    """One model on one runtime: its evaluation, the batch-1 statistics of each timed path,
    images/s of each path at each batch size measured, and the overhead of each adaptive
    path."""
    evaluation: evaluation.ModelEvaluation
    latency: Dict[PointId, latency.LatencyStats]
    throughput: Dict[int, Dict[PointId, float]]
    # Each timed adaptive path's cost beyond the exits its timed images left at.
    overhead: Dict[PointId, latency.ExitOverhead] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """What was measured, with what: ``results[runtime][model name]``, runtimes in
    ``RUNTIMES``' order, models in the order of ``models``; ``at_equal_accuracy[runtime]
    [pair]``: for each point of ``pair.other``, the cheapest point of ``pair.model`` as
    accurate, for every model with exits against each one-exit model (one match: the
    baseline's pass, its point timed) and against each model with exits listed after it;
    ``at_equal_budget[runtime][pair]``: for each point of the latter, the most accurate point
    of ``pair.model`` at no more multiply-adds; ``latency_block``: how the latency was timed.
    The renderers of ``report`` take it whole."""
    options: ComparisonOptions
    images: EvaluationImages
    models: List[LoadedModel]
    results: Dict[str, Dict[str, ModelResult]]
    latency_block: int = 1
    at_equal_accuracy: Dict[str, Dict[Pair, List[Match]]] = dataclasses.field(
        default_factory=dict)
    at_equal_budget: Dict[str, Dict[Pair, List[Match]]] = dataclasses.field(
        default_factory=dict)

    @property
    def runtimes(self) -> List[str]:
        return list(self.results)

    @property
    def adaptive_models(self) -> List[str]:
        """The models with several exits, in the order of ``models``."""
        return [loaded.name for loaded in self.models if len(loaded.cost.exits) > 1]


PathsFor = Callable[[Dict[PointId, List[float]]], Dict[PointId, latency.PathCallable]]


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluatedRuntime:
    """One model on one runtime: its evaluation, and its paths for given operating points
    (thresholds by path name): batch-1 ones to time, by the given routes, batched ones for
    throughput; what each step of a route costs here, to choose routes from."""
    evaluation: evaluation.ModelEvaluation
    batch1: Callable[..., Dict[PointId, latency.PathCallable]]
    batched: PathsFor
    route_timings: Callable[[], litert_runtime.RouteTimings]
    routes: List[int]


def _tensorflow(loaded: LoadedModel, images: EvaluationImages,
                options: ComparisonOptions, **evaluate) -> EvaluatedRuntime:
    result = evaluation.evaluate_model(loaded.model, loaded.cost, images,
                                       batch_size=options.batch_size, **evaluate)
    normalization = images.normalization
    predictor = adaptive.AdaptivePredictor(loaded.model, confidence_kind=options.confidence,
                                           jit_compile=options.xla, normalization=normalization)
    return EvaluatedRuntime(
        result,
        lambda thresholds, routes: latency.batch1_paths(
            loaded.model, predictor, thresholds, jit_compile=options.xla,
            normalization=normalization, routes=routes),
        lambda thresholds: latency.batched_paths(loaded.model, predictor, thresholds,
                                                 normalization=normalization),
        lambda: latency.tensorflow_route_timings(predictor, images.report_pixels[0]),
        list(range(1, loaded.model.num_exits + 1)))


def litert_files(loaded: LoadedModel, images: EvaluationImages, options: ComparisonOptions,
                 directory: str) -> dict:
    """Writes ``loaded``'s LiteRT files for every precision ``options`` asks for into
    ``directory`` with the export's code and options: the files ``ranet.export
    --format=litert`` writes for the same model and flags. Returns the manifest."""
    precisions = [RUNTIMES[r] for r in options.runtimes if RUNTIMES[r] is not None]
    return litert.write_model(directory, loaded.model, loaded.config.model, images.mean,
                              images.std, images.training_pixels, precisions,
                              {"model": loaded.config.model.name,
                               "num_exits": loaded.model.num_exits,
                               "num_classes": loaded.model.num_classes,
                               "confidence": options.confidence})


def _litert(loaded: LoadedModel, images: EvaluationImages, options: ComparisonOptions,
            precision: str, directory: str, **evaluate) -> EvaluatedRuntime:
    """Converts ``loaded`` to LiteRT files in ``directory`` (once for every precision
    ``options`` asks for) and evaluates this precision's."""
    if not os.path.isdir(directory):
        os.makedirs(directory)
        litert_files(loaded, images, options, directory)
    stages = litert_runtime.LiteRTStages(directory, precision,
                                         num_threads=litert_threads(options))
    if options.litert_threads == litert_runtime.AUTO_THREADS:
        logging.info("%s on LiteRT %s: the fastest XNNPACK threads per stage here: %s",
                     loaded.name, precision, stages.threads)
    logging.info("%s: every exit on LiteRT %s", loaded.name, precision)
    result = evaluation.evaluate_exits(
        litert_runtime.softmax(stages.all_exit_logits(images.calibration_pixels)),
        litert_runtime.softmax(stages.all_exit_logits(images.report_pixels)), loaded.cost,
        images, **evaluate)
    paths = functools.partial(latency.litert_paths, stages)
    return EvaluatedRuntime(result, paths, paths, stages.route_timings, stages.routes)


def choose_routes(runtime: EvaluatedRuntime, thresholds: Dict[PointId, Sequence[float]]
                  ) -> Dict[PointId, int]:
    """Each operating point's fastest route on this runtime, from where its thresholds send
    the calibration images and what each step costs here."""
    if not thresholds or len(runtime.routes) == 1:
        return {}
    timings = runtime.route_timings()
    return {point: litert_runtime.choose_route(runtime.evaluation.calibration_fractions(values),
                                               timings, runtime.routes)[0]
            for point, values in thresholds.items()}


def evaluate_runtimes(options: ComparisonOptions, scratch: str
                      ) -> Tuple[List[LoadedModel], EvaluationImages,
                                 Dict[str, Dict[str, EvaluatedRuntime]]]:
    """Loads every model of ``options`` and the images, and evaluates each model on each
    runtime (LiteRT files written under ``scratch``): (models, images, runtimes[runtime]
    [model name]). Thread pools are sized first, before TensorFlow runs an op."""
    devices.configure_threads(options.intra_op_threads, options.inter_op_threads)
    models = model_dir_lib.load_models(options.model_dir, options.checkpoint, options.precision)
    evaluation.check_budgets(models, options.budget_mflops)
    images = report_images.load_images(models[0].config.data.with_data_dir(options.data_dir),
                                       options.split, options.seed, options.max_images,
                                       options.representative_images)
    logging.info("calibrating on %s (%d images), reporting on %s (%d images)",
                 images.calibration_name, len(images.calibration_labels), images.report_name,
                 len(images.report_labels))
    runtimes = {runtime: {} for runtime in options.runtimes}
    for index, loaded in enumerate(models):
        logging.info("%s: accuracy of every exit and operating points", loaded.name)
        evaluate = dict(name=loaded.name, model_dir=loaded.model_dir,
                        checkpoint=loaded.checkpoint, budgets_mflops=options.budget_mflops,
                        fixed_threshold=options.threshold, confidence_kind=options.confidence)
        for runtime in options.runtimes:
            precision = RUNTIMES[runtime]
            runtimes[runtime][loaded.name] = (
                _tensorflow(loaded, images, options, **evaluate) if precision is None else
                _litert(loaded, images, options, precision, os.path.join(scratch, str(index)),
                        **evaluate))
    return models, images, runtimes


def compare(options: ComparisonOptions,
            throughput_batch_sizes: Optional[Sequence[int]] = None) -> List[Comparison]:
    """Evaluates and times every model of ``options`` on every runtime, on the same images.

    Returns one ``Comparison`` per ``options.latency_block``: the models are evaluated and
    their throughput measured once, their batch-1 latency once per block.
    ``throughput_batch_sizes``: batch sizes of the throughput measurement (default: the
    inference batch size). Thread pools are sized first, before TensorFlow runs an op.
    """
    with tempfile.TemporaryDirectory(prefix="ranet_litert_") as scratch:
        models, images, runtimes = evaluate_runtimes(options, scratch)
        at_equal_accuracy, at_equal_budget, timed_thresholds = match_models(
            {runtime: {name: result.evaluation for name, result in by_model.items()}
             for runtime, by_model in runtimes.items()}, images.report_labels)
        # Every path takes raw pixels as float32, as a served request does.
        pixels = images.report_pixels.astype(np.float32)
        timed = pixels[:options.latency_images]
        routes = {}
        for (runtime, name), thresholds in timed_thresholds.items():
            logging.info("%s on %s: timing the routes' steps to choose each point's", name,
                         runtime)
            routes[runtime, name] = choose_routes(runtimes[runtime][name], thresholds)
        batch1 = {(runtime, name): runtimes[runtime][name].batch1(thresholds,
                                                                  routes[runtime, name])
                  for (runtime, name), thresholds in timed_thresholds.items()}
        stats = {}
        for block in options.latency_block:
            logging.info("timing %d paths on %d images one by one, interleaved, %d in a row",
                         sum(map(len, batch1.values())), len(timed), block)
            stats[block] = latency.measure_latency(
                batch1, timed, warmup=options.warmup, block=block,
                progress=lambda done, total: logging.info("latency: %d/%d images", done, total))
        throughput = {runtime: {} for runtime in runtimes}
        for runtime, by_model in runtimes.items():
            # LiteRT stage files take one image at a time: one looped measurement.
            batch_sizes = ((throughput_batch_sizes or [options.batch_size])
                           if RUNTIMES[runtime] is None else [1])
            for name, result in by_model.items():
                throughput[runtime][name] = {}
                for batch_size in batch_sizes:
                    logging.info("%s on %s: throughput at batch %d", name, runtime, batch_size)
                    sample = pixels[:max(options.throughput_images, batch_size)]
                    # The anytime paths are timed at batch 1 only.
                    throughput[runtime][name][batch_size] = {
                        path: latency.measure_throughput(fn, sample, batch_size)
                        for path, fn in result.batched(result.evaluation.timed_points).items()
                        if path.kind != Kind.UP_TO_EXIT}

    def model_result(runtime, name, block):
        evaluation_ = runtimes[runtime][name].evaluation
        timed_stats = stats[block][runtime, name]
        return ModelResult(evaluation_, timed_stats, throughput[runtime][name], overheads(
            evaluation_, timed_stats, timed_thresholds[runtime, name], len(timed),
            routes[runtime, name]))

    return [Comparison(
        options=options, images=images, models=models,
        results={runtime: {m.name: model_result(runtime, m.name, block) for m in models}
                 for runtime in runtimes},
        latency_block=block, at_equal_accuracy=at_equal_accuracy,
        at_equal_budget=at_equal_budget)
        for block in options.latency_block]


def overheads(evaluation_: evaluation.ModelEvaluation,
              timed: Dict[PointId, latency.LatencyStats],
              thresholds: Dict[PointId, Sequence[float]], num_timed: int,
              routes: Optional[Dict[PointId, int]] = None) -> Dict[PointId, latency.ExitOverhead]:
    """The overhead of each timed adaptive path: the exits its timed images (the first
    ``num_timed`` reported ones) left at, from this runtime's own confidences, against the
    times of the network up to each exit."""
    num_exits = len(evaluation_.cost.exits)
    up_to = [timed.get(points.up_to_exit(k)) for k in range(1, num_exits + 1)]
    if num_exits == 1 or None in up_to:
        return {}
    confidences = evaluation_.report_confidences[:, :num_timed]
    result = {}
    for point, values in thresholds.items():
        exits = calibration.exit_indices(confidences, values)
        result[point] = latency.exit_overhead(
            timed[point], calibration.exit_fractions(exits, num_exits), up_to,
            (routes or {}).get(point, num_exits))
    return result


def match_models(evaluations: Dict[str, Dict[str, evaluation.ModelEvaluation]],
                 labels: np.ndarray):
    """Every pair of models matched on every runtime's own outputs (``evaluations[runtime]
    [model]``, on the reported images, whose true classes are ``labels``), and what to time.

    Returns (``Comparison.at_equal_accuracy``, ``Comparison.at_equal_budget``, the
    thresholds to time by (runtime, model): each model's default and budget points, and its
    points at each baseline's accuracy)."""
    at_equal_accuracy = {runtime: _against_baselines(by_model, labels)
                         for runtime, by_model in evaluations.items()}
    at_equal_budget, timed = {}, {}
    for runtime, by_model in evaluations.items():
        for name, evaluation_ in by_model.items():
            timed[runtime, name] = {**evaluation_.timed_points, **{
                m.path: list(m.point.thresholds)
                for pair, matches in at_equal_accuracy[runtime].items() if pair.model == name
                for m in matches}}
        between, at_equal_budget[runtime] = _between_adaptive_models(
            by_model, labels, {name: timed[runtime, name] for name in by_model})
        at_equal_accuracy[runtime].update(between)
    return at_equal_accuracy, at_equal_budget, timed


def _against_baselines(evaluations: Dict[str, evaluation.ModelEvaluation],
                       labels: np.ndarray) -> Dict[Pair, List[Match]]:
    """{pair: [match]}: the point of every model with exits at each one-exit model's
    accuracy, on one runtime's outputs."""
    baselines = [e for e in evaluations.values() if not e.is_adaptive]
    chosen = {}
    for model in (e for e in evaluations.values() if e.is_adaptive):
        chosen.update(equal_accuracy.against_baselines(model, baselines, labels,
                                                       model.timed_points))
    return chosen


def _adaptive_pairs(names: Sequence[str]) -> List[Pair]:
    """Each of ``names`` (the models with exits, in the order given) against each listed
    after it."""
    return [Pair(model, other) for index, model in enumerate(names)
            for other in names[index + 1:]]


def _between_adaptive_models(evaluations: Dict[str, evaluation.ModelEvaluation],
                             labels: np.ndarray,
                             timed_thresholds: Dict[str, Dict[PointId, Sequence[float]]]):
    """({pair: [match]} at equal accuracy, {pair: [match]} at equal budget) on one runtime's
    evaluations: for each pair of models with exits, at each distinct calibrated point of the
    second, the first's points that answer the two questions. Nothing more is timed for
    them: a point has a latency where its thresholds were timed anyway."""
    accuracy, budget = {}, {}
    for pair in _adaptive_pairs([name for name, e in evaluations.items() if e.is_adaptive]):
        model, other = evaluations[pair.model], evaluations[pair.other]
        pool = equal_accuracy.candidates_of(model, labels)
        targets = equal_accuracy.distinct(equal_accuracy.calibrated_candidates(other, labels))
        paths = [equal_accuracy.timed_by_thresholds(timed_thresholds[name])
                 for name in (pair.model, pair.other)]
        accuracy[pair] = equal_accuracy.at_equal_accuracy(pair, pool, targets, *paths)
        budget[pair] = equal_budget.at_equal_budget(pair, pool, targets, *paths)
    return accuracy, budget
