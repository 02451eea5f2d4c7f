"""Measures what adaptive inference buys, side by side with the baselines.

    python -m ranet.eval --model_dir=runs/ranet_cifar10 --model_dir=runs/resnet50_cifar10 \\
        --split=test --budget_mflops=20,40 --threshold=0.85 --report_dir=reports/cifar10

Every model is evaluated on the same images in one process: accuracy of every exit,
thresholds calibrated on validation data for the reference sweep and for each budget,
exit distributions, multiply-adds, and batch-1 latency of every path timed interleaved.
Writes report.json, report.md, PNG plots and TensorBoard scalars into --report_dir.
"""

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
flags.DEFINE_integer("intra_op_threads", 0, "Threads one op may use; 0: every core. 1 "
                     "suits batch-1 latency of small networks (BUILD_NOTES.md).", lower_bound=0)
flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: every core.", lower_bound=0)
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

    from ranet import adaptive, evaluation, latency, report, runtime
    runtime.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    logging.set_verbosity(logging.INFO)

    models = evaluation.load_models(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.precision)
    for loaded in models:
        first_exit = loaded.cost.exits[0].macs
        if loaded.model.num_exits > 1 and budgets and min(budgets) * 1e6 < first_exit:
            raise ValueError(
                f"--budget_mflops={min(budgets):g} is below the cost of {loaded.name}'s "
                f"first exit ({first_exit / 1e6:.2f} M multiply-adds); no operating "
                "point fits. Raise the budget.")
    images = evaluation.load_images(models, FLAGS.split, FLAGS.seed, FLAGS.data_dir)
    logging.info("calibrating on %s (%d images), reporting on %s (%d images)",
                 images.calibration_name, len(images.calibration_labels), images.report_name,
                 len(images.report_labels))

    evaluations, batch1, batched = [], {}, {}
    for loaded in models:
        logging.info("%s: accuracy of every exit and operating points", loaded.name)
        result = evaluation.evaluate_model(
            loaded.model, loaded.cost, images, name=loaded.name, model_dir=loaded.model_dir,
            checkpoint=loaded.checkpoint, budgets_mflops=budgets,
            fixed_threshold=FLAGS.threshold, confidence_kind=FLAGS.confidence,
            batch_size=FLAGS.batch_size)
        evaluations.append(result)
        predictor = adaptive.AdaptivePredictor(loaded.model, confidence_kind=FLAGS.confidence,
                                               jit_compile=FLAGS.xla)
        batch1[loaded.name] = latency.batch1_paths(loaded.model, predictor,
                                                   result.thresholds_by_path,
                                                   jit_compile=FLAGS.xla)
        batched[loaded.name] = latency.batched_paths(loaded.model, predictor,
                                                     result.thresholds_by_path)

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
