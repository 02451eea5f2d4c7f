"""Measures what adaptive inference buys, side by side with the baselines.

    python -m ranet.eval --model_dir=runs/ranet_cifar10 --model_dir=runs/resnet50_cifar10 \\
        --split=test --budget_mflops=20,40 --threshold=0.85 --report_dir=reports/cifar10

Every model is evaluated on the same images in one process: accuracy of every exit,
thresholds calibrated on validation data for the reference sweep and for each budget,
exit distributions, multiply-adds, and batch-1 latency of every path timed interleaved.
Writes report.json, report.md, PNG plots and TensorBoard scalars into --report_dir.
"""

import dataclasses
import os

from absl import flags, logging

from ranet import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model_dir", None, "A trained model directory; repeat the flag to "
                          "evaluate RANet and the baselines together.")
flags.DEFINE_enum("split", "test", ["test", "validation"],
                  "Images to report on. validation: thresholds are calibrated on one half of "
                  "the validation split and reported on the other.")
flags.DEFINE_string("report_dir", None, "Where the report goes.")
flags.DEFINE_list("budget_mflops", [], "Compute budgets (million multiply-adds per image); "
                  "each maps to the most accurate calibrated point within it.")
flags.DEFINE_float("threshold", None, "Also report the seed's single fixed threshold (e.g. 0.85).")
flags.DEFINE_enum("confidence", "max_softmax", ["max_softmax", "entropy"], "Exit confidence.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                  "best: the best checkpoint on validation (falls back to latest).")
flags.DEFINE_string("data_dir", None, "Overrides the data location saved with the models.")
flags.DEFINE_enum("precision", "fp32", ["fp32", "mixed_float16", "mixed_bfloat16"],
                  "Numeric precision of inference.")
flags.DEFINE_bool("xla", False, "XLA-compile the batch-1 paths (full and adaptive) of every "
                  "model alike.")
flags.DEFINE_integer("latency_images", 300, "Images timed one by one for batch-1 latency.")
flags.DEFINE_integer("warmup", 10, "Untimed calls per path before timing.")
flags.DEFINE_integer("batch_size", 256, "Batch size of inference and of the throughput test.")
flags.DEFINE_integer("throughput_images", 2048, "Images per throughput measurement.")
flags.DEFINE_integer("seed", 0, "Seed of the validation halves (--split=validation).")


def _parse_budgets():
    try:
        budgets = [float(b) for b in FLAGS.budget_mflops]
    except ValueError:
        raise ValueError("--budget_mflops takes comma-separated numbers. "
                         f"Received: {','.join(FLAGS.budget_mflops)}") from None
    if any(b <= 0 for b in budgets):
        raise ValueError(f"--budget_mflops must be positive. Received: {budgets}")
    return budgets


def _unique_names(configs, model_dirs):
    names = [c.model.name for c in configs]
    return [name if names.count(name) == 1 else f"{name} ({os.path.basename(d.rstrip('/'))})"
            for name, d in zip(names, model_dirs)]


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model_dir:
        raise ValueError("pass at least one --model_dir (repeat it to compare models)")
    if not FLAGS.report_dir:
        raise ValueError("pass --report_dir=/where/the/report/goes")
    budgets = _parse_budgets()
    if FLAGS.latency_images <= 0 or FLAGS.batch_size <= 0:
        raise ValueError("--latency_images and --batch_size must be positive")

    from ranet import adaptive, checkpoints, costs, data, evaluation, latency, report
    logging.set_verbosity(logging.INFO)

    loaded = []
    for model_dir in FLAGS.model_dir:
        config, model, path = checkpoints.restore_model(model_dir, FLAGS.checkpoint,
                                                        FLAGS.precision)
        loaded.append((model_dir, config, model, path, costs.count(model)))
        logging.info("loaded %s from %s", config.model.name, path)
    first = loaded[0][1].data
    split_fields = ("dataset", "validation_size", "split_seed")
    for model_dir, config, *_ in loaded[1:]:
        if any(getattr(config.data, f) != getattr(first, f) for f in split_fields):
            raise ValueError(f"{model_dir} was trained on another dataset or split than "
                             f"{loaded[0][0]}; models compared together must share them.")
    for model_dir, config, model, _, cost in loaded:
        if model.num_exits > 1 and budgets and min(budgets) * 1e6 < cost.exits[0].macs:
            raise ValueError(
                f"--budget_mflops={min(budgets):g} is below the cost of {config.model.name}'s "
                f"first exit ({cost.exits[0].macs / 1e6:.2f} M multiply-adds); no operating "
                "point fits. Raise the budget.")

    data_config = first if FLAGS.data_dir is None else dataclasses.replace(
        first, data_dir=FLAGS.data_dir)
    splits = data.load_splits(data_config)
    images = evaluation.evaluation_images(splits, FLAGS.split, FLAGS.seed)
    logging.info("calibrating on %s (%d images), reporting on %s (%d images)",
                 images.calibration_name, len(images.calibration_labels), images.report_name,
                 len(images.report_labels))

    names = _unique_names([c for _, c, *_ in loaded], FLAGS.model_dir)
    evaluations, batch1, batched = [], {}, {}
    for name, (model_dir, config, model, path, cost) in zip(names, loaded):
        logging.info("%s: accuracy of every exit and operating points", name)
        result = evaluation.evaluate_model(
            model, cost, images, name=name, model_dir=model_dir, checkpoint=path,
            budgets_mflops=budgets, fixed_threshold=FLAGS.threshold,
            confidence_kind=FLAGS.confidence, batch_size=FLAGS.batch_size)
        evaluations.append(result)
        predictor = adaptive.AdaptivePredictor(model, confidence_kind=FLAGS.confidence,
                                               jit_compile=FLAGS.xla)
        batch1[name] = latency.batch1_paths(model, predictor, result.thresholds_by_path,
                                            jit_compile=FLAGS.xla)
        batched[name] = latency.batched_paths(model, predictor, result.thresholds_by_path)

    timed = images.report_images[:FLAGS.latency_images]
    logging.info("timing %d paths on %d images one by one, interleaved",
                 sum(map(len, batch1.values())), len(timed))
    latency_ms = latency.measure_latency(
        batch1, timed, warmup=FLAGS.warmup,
        progress=lambda i, n: logging.info("latency: %d/%d images", i, n))
    throughput_images = images.report_images[:FLAGS.throughput_images]
    throughput = {name: {path: latency.measure_throughput(fn, throughput_images, FLAGS.batch_size)
                         for path, fn in paths.items()} for name, paths in batched.items()}

    environment = latency.device_info()
    result = {
        "split": images.report_name, "calibration_split": images.calibration_name,
        "num_images": len(images.report_labels), "device": environment["device"],
        "tensorflow": environment["tensorflow"], "environment": environment,
        "precision": FLAGS.precision, "xla": FLAGS.xla, "confidence": FLAGS.confidence,
        "latency_images": len(timed), "batch_size": FLAGS.batch_size,
        "models": [report.model_json(e, {p: s.to_json() for p, s in latency_ms[e.name].items()},
                                     throughput[e.name]) for e in evaluations]}
    for path in report.write(result, evaluations, FLAGS.report_dir):
        logging.info("wrote %s", path)


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)


if __name__ == "__main__":
    run()
