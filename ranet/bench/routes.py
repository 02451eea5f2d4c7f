"""Early exit stage by stage against the cheapest route, per model, runtime and point.

    python -m ranet.bench.routes --model_dir=runs/ranet --model_dir=runs/msdnet \\
        --runtimes=tf,litert,litert_int8 --budget_mflops=30,60 --json=routes.json

Takes the eval's flags (``ComparisonOptions``): the same models, images, calibrated points
and LiteRT files as ``ranet.eval``. For every model with exits, every runtime and every
timed point (the default one and each budget's), it times in one interleaved run, image by
image: the point stage by stage (route K, what early exit did before routes), the point by
the route chosen for it (``litert_runtime.choose_route``, from where the calibration
images leave and this host's step times), the full network in one call, and the network up to
each exit. For both ways it prints the mean, ``expected_ms`` (the share of the timed images
leaving at each exit times the time up to that exit: early exit with free hand-offs) and the
overhead (mean / expected_ms), with the CPU model; ``--json`` keeps everything.
"""

import os
import tempfile
from typing import Dict, List

import numpy as np
from absl import flags, logging

from ranet import cli, host, jsonio
from ranet.inference import calibration, comparison, latency, points
from ranet.inference.comparison import ComparisonOptions

STAGE_BY_STAGE, ROUTE = "stage_by_stage", "by_route"


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ComparisonOptions, values)
    flags.DEFINE_string("json", None, "Also write the results here.", flag_values=values)


def _paths(runtime: comparison.EvaluatedRuntime, thresholds, routes) -> Dict:
    """Every path to time for one model on one runtime: the full network, the network up to
    each exit, and each point both ways, keyed (point, way). The two ways of a point share
    their files' interpreters, so they sit at opposite ends of the order: timed one right
    after the other, the second would find the first's weights still cached."""
    before = runtime.batch1(thresholds, {})
    after = runtime.batch1(thresholds, routes)
    paths = {(point, STAGE_BY_STAGE): before[point] for point in thresholds}
    paths.update({point: fn for point, fn in before.items()
                  if point == points.FULL or point.kind == points.Kind.UP_TO_EXIT})
    paths.update({(point, ROUTE): after[point] for point in thresholds})
    return paths


def main(values: flags.FlagValues) -> List[dict]:
    options = cli.from_flags(ComparisonOptions, values)
    with tempfile.TemporaryDirectory(prefix="ranet_routes_") as scratch:
        _, images, runtimes = comparison.evaluate_runtimes(options, scratch)
        timed = images.report_pixels[:options.latency_images].astype(np.float32)
        paths, chosen = {}, {}
        for runtime, by_model in runtimes.items():
            for name, result in by_model.items():
                if not result.evaluation.is_adaptive:
                    continue
                thresholds = result.evaluation.timed_points
                logging.info("%s on %s: timing the routes' steps", name, runtime)
                chosen[runtime, name] = comparison.choose_routes(result, thresholds)
                paths[runtime, name] = _paths(result, thresholds, chosen[runtime, name])
        logging.info("timing %d paths on %d images, interleaved",
                     sum(map(len, paths.values())), len(timed))
        stats = latency.measure_latency(
            paths, timed, warmup=options.warmup, block=options.latency_block[0],
            progress=lambda done, total: logging.info("latency: %d/%d images", done, total))
    rows = []
    for (runtime, name), timed_stats in stats.items():
        evaluation = runtimes[runtime][name].evaluation
        num_exits = len(evaluation.cost.exits)
        up_to = [timed_stats[points.up_to_exit(k)] for k in range(1, num_exits + 1)]
        for point, thresholds in evaluation.timed_points.items():
            exits = calibration.exit_indices(evaluation.report_confidences[:, :len(timed)],
                                             thresholds)
            fractions = calibration.exit_fractions(exits, num_exits)
            row = {"model": name, "runtime": runtime, "point": point.path,
                   "route": chosen[runtime, name][point],
                   "full_mean_ms": timed_stats[points.FULL].mean}
            for way in (STAGE_BY_STAGE, ROUTE):
                overhead = latency.exit_overhead(timed_stats[point, way], fractions, up_to)
                row[way] = {**timed_stats[point, way].to_json(), **overhead.to_json()}
            rows.append(row)
    _print(rows)
    if values.json:
        jsonio.write(values.json, {"cpu": host.cpu_name(), "cores": os.cpu_count(),
                                   "latency_images": len(timed), "results": rows})
    return rows


def _print(rows: List[dict]) -> None:
    print(f"\nCPU: {host.cpu_name()}, {os.cpu_count()} cores; means in ms")
    print(f"{'model':<8} {'runtime':<12} {'point':<16} {'route':>5} {'expected':>8} "
          f"{'before':>7} {'over':>5} {'after':>7} {'over':>5} {'full':>7}")
    for row in rows:
        before, after = row[STAGE_BY_STAGE], row[ROUTE]
        print(f"{row['model']:<8} {row['runtime']:<12} {row['point']:<16} {row['route']:>5} "
              f"{after['expected_ms']:>8.3f} {before['mean']:>7.3f} {before['overhead']:>5.2f} "
              f"{after['mean']:>7.3f} {after['overhead']:>5.2f} {row['full_mean_ms']:>7.3f}")


if __name__ == "__main__":
    cli.run(main, define_flags)
