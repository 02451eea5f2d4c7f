"""Where a LiteRT export's time goes, stage by stage: ops, multiply-adds, p50 per precision.

    python -m ranet.export --model_dir=runs/ranet --export_dir=/tmp/ranet_litert --format=litert
    python -m ranet.bench.litert_stages --export_dir=/tmp/ranet_litert \\
        --export_dir=/tmp/vgg16_litert --threads=1,2

XNNPACK runs each stage as one delegated node, and the Python interpreter of ai-edge-litert
exposes no op profile (nor does the wheel's benchmark script). So this benchmark times every
stage of every image (in order, as early exit runs them),
counts each stage file's operators, and fits ``p50 = a * ops + b * multiply-adds`` per
precision over all stages: ``a`` is what one op costs whatever its size, ``1 / b`` the rate
at which the arithmetic runs. That says how much of a model's time is per-op cost, which int8
does not reduce, and how much is arithmetic, which it does. It also times every exit both
ways, the stage files one after another and the one-graph file, image by image in turns:
their ratio is what the hand-offs between stages cost.

``--between`` says what happens between two images, untimed, to take apart what a call
that follows other work pays over a warm one (``ranet.eval``'s interleaved protocol):
``nothing`` (warm: the images run back to back), ``sleep`` (a pause of ``--sleep_ms``: the
XNNPACK worker threads go idle and must be woken; the caches keep the weights), ``flush``
(``--flush_mb`` of other memory read: the caches lose the weights; the threads stay awake)
and ``both``.
"""

import collections
import itertools
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
from absl import flags
from ai_edge_litert.tools import flatbuffer_utils

from ranet import cli, jsonio
from ranet.errors import UsageError
from ranet.inference.serving import litert_runtime


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_multi_string("export_dir", [], "A LiteRT export (ranet.export "
                              "--format=litert); repeat the flag for several models.", **define)
    flags.DEFINE_list("precisions", ["fp32", "int8"], "Precisions to time (those the export "
                      "holds).", **define)
    flags.DEFINE_list("threads", ["2"], "XNNPACK thread counts to time.", **define)
    flags.DEFINE_integer("images", 100, "Images timed per setting.", lower_bound=1, **define)
    flags.DEFINE_integer("warmup", 5, "Untimed images first.", lower_bound=0, **define)
    flags.DEFINE_list("between", ["nothing"], "What happens between two images, untimed: "
                      f"some of {', '.join(BETWEEN)}.", **define)
    flags.DEFINE_float("sleep_ms", 20.0, "--between=sleep: the pause.", lower_bound=0,
                       **define)
    flags.DEFINE_integer("flush_mb", 128, "--between=flush: memory read to evict the caches "
                         "(more than the last-level cache).", lower_bound=1, **define)
    flags.DEFINE_string("json", None, "Also write the results here.", **define)


BETWEEN = ("nothing", "sleep", "flush", "both")


def between_images(kind: str, sleep_ms: float, flush_mb: int) -> Callable[[], None]:
    """What runs between two timed images (see the module docstring)."""
    if kind not in BETWEEN:
        raise UsageError(f"--between takes some of {', '.join(BETWEEN)}. Received: {kind!r}")
    other_memory = np.ones(flush_mb * 2 ** 20 // 8) if kind in ("flush", "both") else None

    def run():
        if other_memory is not None:
            other_memory.sum()
        if kind in ("sleep", "both"):
            time.sleep(sleep_ms / 1e3)
    return run


def operator_counts(path: str) -> Dict[str, int]:
    """How many operators of each kind a .tflite file's main graph holds."""
    model = flatbuffer_utils.read_model(path)
    names = [flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
             for op in model.subgraphs[0].operators]
    return dict(collections.Counter(names))


def time_stages(stages: litert_runtime.LiteRTStages, images: np.ndarray,
                warmup: int, between: Callable[[], None] = lambda: None) -> List[float]:
    """p50 milliseconds of each stage, every image running every stage in order, with
    ``between`` run (untimed) before each image."""
    seconds = np.empty((len(images), stages.num_exits))
    for row, image in enumerate(np.concatenate([images[:warmup], images])):
        between()
        for k in range(stages.num_exits):
            started = time.perf_counter()
            stages.run_stage(k, image)
            if row >= warmup:
                seconds[row - warmup, k] = time.perf_counter() - started
    return [float(ms) for ms in 1e3 * np.median(seconds, axis=0)]


def time_chain_and_one_graph(stages: litert_runtime.LiteRTStages, images: np.ndarray,
                             warmup: int, between: Callable[[], None] = lambda: None):
    """(p50 ms of every stage file run in order, p50 ms of the one-graph file that computes
    the same exits), timed image by image, the two in turns (which goes first alternates)."""
    def chain(image):
        for k in range(stages.num_exits):
            stages.run_stage(k, image)

    paths = [chain, stages.every_exit]
    seconds = np.empty((len(images), 2))
    for row, image in enumerate(np.concatenate([images[:warmup], images])):
        for turn in (row % 2, 1 - row % 2):
            between()
            started = time.perf_counter()
            paths[turn](image)
            if row >= warmup:
                seconds[row - warmup, turn] = time.perf_counter() - started
    chained, one_graph = 1e3 * np.median(seconds, axis=0)
    return float(chained), float(one_graph)


def fit_costs(ops: List[int], macs: List[float], ms: List[float]) -> Dict[str, Optional[float]]:
    """Least squares of ``ms = a * ops + b * macs`` over stages.

    ``gmacs_per_s`` is None where the fit gives multiply-adds no positive cost: the stages'
    times do not grow with their arithmetic at all.
    """
    design = np.stack([np.asarray(ops, float), np.asarray(macs, float)], axis=1)
    (per_op, per_mac), *_ = np.linalg.lstsq(design, np.asarray(ms, float), rcond=None)
    return {"us_per_op": 1e3 * float(per_op),
            "gmacs_per_s": 1e-6 / float(per_mac) if per_mac > 0 else None}


def main(values: flags.FlagValues) -> dict:
    if not values.export_dir:
        raise UsageError("pass at least one --export_dir (a folder written by ranet.export "
                         "--format=litert)")
    try:
        threads = [int(t) for t in values.threads]
    except ValueError:
        raise UsageError("--threads takes comma-separated integers. "
                         f"Received: --threads={','.join(values.threads)}") from None
    betweens = {kind: between_images(kind, values.sleep_ms, values.flush_mb)
                for kind in values.between}
    rng = np.random.default_rng(0)
    results = []
    for export_dir in values.export_dir:
        manifest = litert_runtime.read_manifest(export_dir)
        cumulative = [0, *manifest["exit_macs"]]
        stage_macs = [b - a for a, b in zip(cumulative, cumulative[1:])]
        images = rng.integers(0, 256, (values.images, *manifest["input"]["shape"][1:]),
                              dtype=np.uint8)
        for precision in values.precisions:
            files = [os.path.join(export_dir, f)
                     for f in manifest["precisions"][precision]["files"]]
            counts = [operator_counts(f) for f in files]
            ops = [sum(c.values()) for c in counts]
            for num_threads, (kind, between) in itertools.product(threads, betweens.items()):
                stages = litert_runtime.LiteRTStages(export_dir, precision, num_threads)
                ms = time_stages(stages, images, values.warmup, between)
                chained, one_graph = time_chain_and_one_graph(stages, images, values.warmup,
                                                              between)
                results.append({
                    "model": manifest["model"], "export_dir": export_dir,
                    "precision": precision, "threads": num_threads, "between": kind,
                    "stages": [{"stage": k + 1, "ops": ops[k], "operators": counts[k],
                                "macs": stage_macs[k], "p50_ms": ms[k]}
                               for k in range(len(files))],
                    "fit": fit_costs(ops, stage_macs, ms) if len(files) > 1 else None,
                    "chained_p50_ms": chained, "one_graph_p50_ms": one_graph,
                    "chained_over_one_graph": chained / one_graph})
    _print(results)
    if values.json:
        jsonio.write(values.json, {"results": results})
    return {"results": results}


def _print(results: List[dict]) -> None:
    print(f"\n{'model':<10} {'prec':<5} {'thr':>3} {'between':<8} {'stage':>5} {'ops':>5} "
          f"{'conv':>5} {'M MACs':>8} {'p50 ms':>8} {'GMAC/s':>7} {'us/op':>6}")
    for result in results:
        for stage in result["stages"]:
            convs = sum(n for name, n in stage["operators"].items() if "CONV" in name)
            print(f"{result['model']:<10} {result['precision']:<5} {result['threads']:>3} "
                  f"{result['between']:<8} {stage['stage']:>5} {stage['ops']:>5} {convs:>5} "
                  f"{stage['macs'] / 1e6:>8.2f} {stage['p50_ms']:>8.3f} "
                  f"{stage['macs'] / stage['p50_ms'] / 1e6:>7.1f} "
                  f"{1e3 * stage['p50_ms'] / stage['ops']:>6.1f}")
        if result["fit"]:
            fit = result["fit"]
            rate = (f"multiply-adds at {fit['gmacs_per_s']:.1f} GMAC/s" if fit["gmacs_per_s"]
                    else "no time that grows with the multiply-adds")
            print(f"{result['model']:<10} {result['precision']:<5} {result['threads']:>3} "
                  f"{result['between']:<8} fit: {fit['us_per_op']:.1f} us per op + {rate}")
        print(f"{result['model']:<10} {result['precision']:<5} {result['threads']:>3} "
              f"{result['between']:<8} every exit: stage files in order "
              f"{result['chained_p50_ms']:.3f} ms, one graph {result['one_graph_p50_ms']:.3f} "
              f"ms ({result['chained_over_one_graph']:.2f}x)")


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
