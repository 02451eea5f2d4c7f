"""Several trained models measured alike, in one process: what ``ranet.eval`` and
``ranet.bench.inference`` both do.

For every model: accuracy of every exit and calibrated operating points on the same images
(``evaluation``), then batch-1 latency of every path timed interleaved and batched throughput
(``latency``). ``ComparisonOptions`` is also the flag set of both binaries.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

from absl import logging

from ranet import config as config_lib
from ranet import devices
from ranet.config import flag, require
from ranet.inference import adaptive, evaluation, latency
from ranet.training.model_dir import CHECKPOINT_CHOICES

SPLITS = ("test", "validation")


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
    seed: int = flag(0, "Seed of the validation halves (--split=validation).")
    xla: bool = flag(False, "XLA-compile the batch-1 paths (full and adaptive) of every model "
                     "alike (on a CPU it speeds RANet up and slows VGG16 down: BUILD_NOTES.md).")
    intra_op_threads: int = flag(0, "Threads one op may use; 0: every core. 1 suits batch-1 "
                                 "latency of small networks (BUILD_NOTES.md).", lower_bound=0)
    inter_op_threads: int = flag(0, "Ops run at once; 0: every core.", lower_bound=0)
    latency_images: int = flag(300, "Images timed one by one for batch-1 latency.")
    warmup: int = flag(10, "Untimed calls per path before timing.")
    batch_size: int = flag(256, "Batch size of inference and of the throughput test.")
    throughput_images: int = flag(2048, "Images per throughput measurement.")

    def __post_init__(self):
        require(bool(self.model_dir),
                "pass at least one --model_dir (repeat it to compare models)")
        require(all(b > 0 for b in self.budget_mflops),
                f"--budget_mflops must be positive. Received: {list(self.budget_mflops)}")
        require(self.latency_images > 0 and self.batch_size > 0 and self.throughput_images > 0,
                "--latency_images, --batch_size and --throughput_images must be positive. "
                f"Received: {self.latency_images}, {self.batch_size}, {self.throughput_images}")
        require(self.warmup >= 0, f"--warmup must be >= 0. Received: {self.warmup}")


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """What was measured. ``throughput``: model -> batch size -> path -> images/s."""
    images: evaluation.EvaluationImages
    models: List[evaluation.LoadedModel]
    evaluations: List[evaluation.ModelEvaluation]
    latency: Dict[str, Dict[str, latency.LatencyStats]]
    throughput: Dict[str, Dict[int, Dict[str, float]]]


def compare(options: ComparisonOptions,
            throughput_batch_sizes: Optional[Sequence[int]] = None) -> Comparison:
    """Evaluates and times every model of ``options`` on the same images.

    ``throughput_batch_sizes``: batch sizes of the throughput measurement (default: the
    inference batch size). Thread pools are sized first, before TensorFlow runs an op.
    """
    devices.configure_threads(options.intra_op_threads, options.inter_op_threads)
    models = evaluation.load_models(options.model_dir, options.checkpoint, options.precision)
    evaluation.check_budgets(models, options.budget_mflops)
    images = evaluation.load_images(models, options.split, options.seed, options.data_dir)
    logging.info("calibrating on %s (%d images), reporting on %s (%d images)",
                 images.calibration_name, len(images.calibration_labels), images.report_name,
                 len(images.report_labels))

    evaluations, batch1, batched = [], {}, {}
    for loaded in models:
        logging.info("%s: accuracy of every exit and operating points", loaded.name)
        result = evaluation.evaluate_model(
            loaded.model, loaded.cost, images, batch_size=options.batch_size, name=loaded.name,
            model_dir=loaded.model_dir, checkpoint=loaded.checkpoint,
            budgets_mflops=options.budget_mflops, fixed_threshold=options.threshold,
            confidence_kind=options.confidence)
        evaluations.append(result)
        predictor = adaptive.AdaptivePredictor(loaded.model, confidence_kind=options.confidence,
                                               jit_compile=options.xla)
        batch1[loaded.name] = latency.batch1_paths(loaded.model, predictor,
                                                   result.thresholds_by_path,
                                                   jit_compile=options.xla)
        batched[loaded.name] = latency.batched_paths(loaded.model, predictor,
                                                     result.thresholds_by_path)

    timed = images.report_images[:options.latency_images]
    logging.info("timing %d paths on %d images one by one, interleaved",
                 sum(map(len, batch1.values())), len(timed))
    latency_stats = latency.measure_latency(
        batch1, timed, warmup=options.warmup,
        progress=lambda done, total: logging.info("latency: %d/%d images", done, total))
    throughput = {}
    for name, paths in batched.items():
        throughput[name] = {}
        for batch_size in throughput_batch_sizes or [options.batch_size]:
            logging.info("%s: throughput at batch %d", name, batch_size)
            sample = images.report_images[:max(options.throughput_images, batch_size)]
            throughput[name][batch_size] = {
                path: latency.measure_throughput(fn, sample, batch_size)
                for path, fn in paths.items()}
    return Comparison(images=images, models=models, evaluations=evaluations,
                      latency=latency_stats, throughput=throughput)
