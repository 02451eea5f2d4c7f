"""Measures what adaptive inference buys, side by side with the baselines.

    python -m ranet.eval --model_dir=runs/ranet_cifar10 --model_dir=runs/resnet50_cifar10 \\
        --split=test --budget_mflops=20,40 --threshold=0.85 --report_dir=reports/cifar10

Every model is evaluated on the same images in one process: accuracy of every exit,
thresholds calibrated on validation data for the reference sweep and for each budget,
exit distributions, multiply-adds, and batch-1 latency of every path timed interleaved.
Writes report.json, report.md, PNG plots and TensorBoard scalars into --report_dir (with
several --latency_block values, one such report per block in --report_dir/latency_block<N>).
"""

from absl import flags, logging

from ranet import cli
from ranet.errors import UsageError
from ranet.inference.comparison import ComparisonOptions


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ComparisonOptions, values)
    flags.DEFINE_string("report_dir", None, "Where the report goes.", flag_values=values)


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ComparisonOptions, values)
    if not values.report_dir:
        raise UsageError("pass --report_dir=/where/the/report/goes")
    from ranet.inference import comparison, report
    results = comparison.compare(options)
    report_dirs = report.report_dirs(values.report_dir, options.latency_block)
    contents = []
    for result in results:
        content, paths = report.write(result, report_dirs[result.latency_block])
        contents.append(content)
        for path in paths:
            logging.info("wrote %s", path)
    return contents[0] if len(contents) == 1 else contents


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
