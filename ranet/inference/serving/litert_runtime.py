"""Runs a LiteRT export (``litert``) with real early exit, needing only ai-edge-litert and numpy.

One interpreter per stage (XNNPACK, LiteRT's default CPU delegate, with ``num_threads``).
Stage k's inputs are copied straight from the output buffers of the stages that made them
into its own input buffers, once each, just before it runs: nothing is copied for a stage
that does not run, and no feature passes through an intermediate array.

The adaptive loop, as a client writes it with LiteRT's C++, Java or Kotlin API (the
manifest gives the files, the tensor names and the thresholds):

    features = {"images": pixels}                     # float32 [1, H, W, 3], 0..255
    for k, stage in enumerate(manifest["stages"]):
        for name in stage["inputs"]:                  # each from the stage that made it
            interpreter[k].input(name).copy_from(features[name])
        interpreter[k].invoke()
        features.update(interpreter[k].outputs())     # views of its output buffers
        p = softmax(features["logits"])
        if k == last or confidence(p) >= thresholds[k]:   # max(p), or sum(p log p)
            return argmax(p), k + 1                   # the class and the exit it left at

That loop is route K. Route s runs it for stages 1..s-1 only; an image still undecided then
runs ``from_stage<s>.tflite`` (stages s..K in one call, fed the same way; s = 1 is
``all_exits.tflite``) and leaves at the first sure exit among its outputs. Features are copied
as they are: float32, or int8 at the producer's scale in an int8 export. The manifest names
each point's fastest route on the export host (``routes``) and the step times that chose it.
"""

import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from ranet import host, jsonio
from ranet.errors import MissingPathError, UsageError
from ranet.inference import points

FORMAT = "ranet-litert-stages/1"
MANIFEST = "manifest.json"
SIGNATURE = "serving_default"
PRECISIONS = ("fp32", "int8")
IMAGES, LOGITS = "images", "logits"
# The names ranet.inference.adaptive gives them (this module must not import TensorFlow).
MAX_SOFTMAX, ENTROPY = "max_softmax", "entropy"


# num_threads="auto": each file gets the XNNPACK thread count, 1..cores, that runs it fastest
# on this host, timed when the files are loaded. A second thread slows the small stages of a
# RANet (waking it costs more than it saves) and speeds the large ones up, so one count for
# every stage is the wrong unit; and the host that serves, not the one that exported, decides.
AUTO_THREADS = "auto"
_TIMED_CALLS, _WARMUP_CALLS = 15, 3
Threads = Union[int, str, None]


def _median_invoke_seconds(interpreter: Interpreter) -> float:
    interpreter.allocate_tensors()
    for _ in range(_WARMUP_CALLS):
        interpreter.invoke()
    seconds = []
    for _ in range(_TIMED_CALLS):
        started = time.perf_counter()
        interpreter.invoke()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def fastest_interpreter(path: str, max_threads: Optional[int] = None) -> Tuple[Interpreter, int]:
    """The file's interpreter at the thread count (1..max_threads, default every core) whose
    median call is fastest here, and that count. Inputs are left as allocated (zeros): no
    kernel here changes its work with the values."""
    best = None
    for count in range(1, (max_threads or os.cpu_count()) + 1):
        interpreter = Interpreter(model_path=path, num_threads=count)
        seconds = _median_invoke_seconds(interpreter)
        if best is None or seconds < best[0]:
            best = (seconds, interpreter, count)
    return best[1], best[2]


def _interpreter(path: str, num_threads: Threads) -> Tuple[Interpreter, int]:
    """(interpreter, its thread count): a count, None for LiteRT's default (one), or auto."""
    if num_threads == AUTO_THREADS:
        return fastest_interpreter(path)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive count, None (one) or {AUTO_THREADS!r}. "
                         f"Received: num_threads={num_threads!r}")
    return Interpreter(model_path=path, num_threads=num_threads), num_threads or 1


def exit_logits_name(k: int) -> str:
    """The all-exits files' output of exit k (0-based)."""
    return f"exit{k + 1}_logits"


def all_exits_file(batch_size: int) -> str:
    return "all_exits.tflite" if batch_size == 1 else f"all_exits_batch{batch_size}.tflite"


def from_stage_file(s: int) -> str:
    """The batch-1 file of stages s..K (1-based) in one graph."""
    return f"from_stage{s}.tflite"


def up_to_exit_file(k: int) -> str:
    """The batch-1 file of exits 1..k (1-based) in one graph."""
    return f"exits_1_to_{k}.tflite"


def signature_names(content: bytes) -> Dict[str, List[str]]:
    """The input and output tensor names of a stage file's signature."""
    signature = Interpreter(model_content=content).get_signature_list()[SIGNATURE]
    return {"inputs": list(signature["inputs"]), "outputs": list(signature["outputs"])}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def confidence(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """How sure each row is, higher is surer: max softmax, or the negative entropy."""
    if kind == MAX_SOFTMAX:
        return probabilities.max(axis=-1)
    if kind == ENTROPY:
        safe = np.where(probabilities > 0, probabilities, 1.0)
        return np.sum(probabilities * np.log(safe), axis=-1)
    raise ValueError(f"confidence must be one of {MAX_SOFTMAX}, {ENTROPY}. "
                     f"Received: confidence={kind!r}")


def exit_fractions(probabilities: np.ndarray, thresholds: Sequence[float],
                   kind: str) -> List[float]:
    """The share of images leaving at each exit, for every exit's softmax [K, N, C]."""
    sure = confidence(probabilities, kind) >= np.asarray(thresholds, np.float64)[:, None]
    sure[-1] = True
    counts = np.bincount(np.argmax(sure, axis=0), minlength=len(sure))
    return [float(c) for c in counts / sure.shape[1]]


def read_manifest(export_dir: str) -> dict:
    path = os.path.join(export_dir, MANIFEST)
    if not os.path.isfile(path):
        raise MissingPathError(f"{path} does not exist: {export_dir} is not a LiteRT export. "
                                "Write one with python -m ranet.export --format=litert.")
    manifest = jsonio.read(path, "Export the model again with python -m ranet.export "
                                 "--format=litert.")
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path} is not a manifest this runtime reads (format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r}). Export the model "
                         "again with this version of ranet.")
    return manifest


class AllExits:
    """The file that runs every exit in one graph, at its static batch.

    Args:
        path: ``<precision>/all_exits[_batch<N>].tflite`` of an export.
        num_exits: how many exit logits it returns.
        num_threads: XNNPACK threads (None: LiteRT's default, one; "auto": the fastest here).
    """

    def __init__(self, path: str, num_exits: int, num_threads: Threads = None):
        self.interpreter, self.num_threads = _interpreter(path, num_threads)
        runner = self.interpreter.get_signature_runner(SIGNATURE)
        image = runner.get_input_details()[IMAGES]
        outputs = runner.get_output_details()
        del runner  # it holds the interpreter; allocate and invoke without it
        self.interpreter.allocate_tensors()
        self.batch_size, self.image_shape = int(image["shape"][0]), tuple(image["shape"][1:])
        self._image = self.interpreter.tensor(image["index"])
        self._logits = [self.interpreter.tensor(outputs[exit_logits_name(k)]["index"])
                        for k in range(num_exits)]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Every exit's logits, float32 [K, N, C], for raw pixels [N, H, W, 3], a batch per
        call (the last one filled up with copies of its first image)."""
        images = np.reshape(images, (-1, *self.image_shape))
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            if len(chunk) < self.batch_size:  # a full chunk (batch 1 always) is copied as is
                chunk = np.concatenate([chunk, np.repeat(
                    chunk[:1], self.batch_size - len(chunk), axis=0)])
            np.copyto(self._image(), chunk, casting="unsafe")
            self.interpreter.invoke()
            kept = min(self.batch_size, len(images) - start)
            outputs.append(np.stack([logits()[:kept] for logits in self._logits]))
        return np.concatenate(outputs, axis=1)


class LiteRTStages:
    """The stage interpreters of one precision of an export, wired feature to feature.

    Args:
        export_dir: a folder written by ``python -m ranet.export --format=litert``.
        precision: one of the precisions the export holds ("fp32", "int8").
        num_threads: XNNPACK threads per interpreter: a count, None for LiteRT's default
            (one), or "auto": each file at the count that runs it fastest on this host, timed
            as it loads (``threads`` then says which).
    """

    def __init__(self, export_dir: str, precision: str = "fp32",
                 num_threads: Threads = None):
        self.manifest = read_manifest(export_dir)
        available = self.manifest["precisions"]
        if precision not in available:
            raise UsageError(f"precision must be one of {', '.join(available)} (what "
                             f"{export_dir} holds). Received: precision={precision!r}")
        self.precision = precision
        self.num_exits = self.manifest["num_exits"]
        self.num_classes = self.manifest["num_classes"]
        self.image_shape = tuple(self.manifest["input"]["shape"])
        loaded = [_interpreter(os.path.join(export_dir, path), num_threads)
                  for path in available[precision]["files"]]
        self.interpreters = [interpreter for interpreter, _ in loaded]
        self.threads = [count for _, count in loaded]
        # Exports made before the all-exits files have none: the stages then serve.
        self._all_exits_paths = {int(batch): os.path.join(export_dir, path) for batch, path
                                 in available[precision].get("all_exits", {}).items()}
        self._all_exits: Dict[int, AllExits] = {}
        self._up_to_exit_paths = {int(k): os.path.join(export_dir, path) for k, path
                                  in available[precision].get("up_to_exit", {}).items()}
        self._up_to_exit: Dict[int, AllExits] = {}
        self._num_threads = num_threads
        self._from_stage_paths = {int(first): os.path.join(export_dir, path) for first, path
                                  in available[precision].get("from_stage", {}).items()}
        self._from_stage: Dict[int, "_FromStage"] = {}
        self._export_dir = export_dir
        inputs, self._outputs = [], []
        for interpreter in self.interpreters:
            runner = interpreter.get_signature_runner(SIGNATURE)
            inputs.append({name: d["index"] for name, d in runner.get_input_details().items()})
            self._outputs.append({name: d["index"]
                                  for name, d in runner.get_output_details().items()})
            del runner  # it holds the interpreter; allocate and invoke without it
            interpreter.allocate_tensors()
        self._image = self.interpreters[0].tensor(inputs[0][IMAGES])
        self._logits = [interpreter.tensor(out[LOGITS])
                        for interpreter, out in zip(self.interpreters, self._outputs)]
        self._copies = [self._feeds(self.interpreters[k], stage_inputs, k)
                        for k, stage_inputs in enumerate(inputs)]
        self._timings: Optional[RouteTimings] = None

    def _feeds(self, interpreter: Interpreter, inputs: Dict[str, int], first: int):
        """(input buffer, output buffer of the stage that made it) for each feature a file
        that runs from stage ``first`` (0-based) reads: the last stage before it that
        outputs the name. Features are copied as they are (float32, or int8 at the
        producer's scale)."""
        copies = []
        for name, index in inputs.items():
            if name == IMAGES:
                continue
            producer = max((j for j in range(first) if name in self._outputs[j]), default=None)
            if producer is None:
                raise UsageError(f"stage {first + 1} reads {name!r}, which no earlier stage "
                                 f"outputs: {self._export_dir} is damaged; export it again.")
            copies.append((interpreter.tensor(index),
                           self.interpreters[producer].tensor(self._outputs[producer][name])))
        return copies

    def run_stage(self, k: int, image: Optional[np.ndarray] = None) -> np.ndarray:
        """Runs stage k (0-based) on the features the earlier stages left; returns its logits.

        Stage 0 takes ``image``: raw RGB pixels [H, W, 3] or [1, H, W, 3], any real dtype.
        Stage k > 0 reads what stages < k computed for the same image, so run them in order.
        """
        if k == 0:
            np.copyto(self._image(), np.reshape(image, self.image_shape), casting="unsafe")
        for destination, source in self._copies[k]:
            np.copyto(destination(), source())
        self.interpreters[k].invoke()
        return self._logits[k]()[0].copy()

    def all_exits(self, batch_size: int) -> Optional[AllExits]:
        """The one-graph file of every exit at ``batch_size`` (loaded once), if exported."""
        if batch_size not in self._all_exits_paths:
            return None
        if batch_size not in self._all_exits:
            self._all_exits[batch_size] = AllExits(self._all_exits_paths[batch_size],
                                                   self.num_exits, self._num_threads)
        return self._all_exits[batch_size]

    def up_to_exit(self, k: int) -> Optional[AllExits]:
        """The batch-1 file of exits 1..k in one graph (k = K: the every-exit file), loaded
        once, if exported."""
        if k == self.num_exits:
            return self.all_exits(1)
        if k not in self._up_to_exit_paths:
            return None
        if k not in self._up_to_exit:
            self._up_to_exit[k] = AllExits(self._up_to_exit_paths[k], k, self._num_threads)
        return self._up_to_exit[k]

    def from_stage(self, first: int) -> Optional["_FromStage"]:
        """The file that runs stages ``first``..K (1-based) in one call, fed by the stages
        before it (loaded once): first = 1 is the batch-1 one-graph file; None where the
        export has no such file (first = K: the last stage file is that route)."""
        if first == 1:
            path = self._all_exits_paths.get(1)
        else:
            path = self._from_stage_paths.get(first)
        if path is None:
            return None
        if first not in self._from_stage:
            self._from_stage[first] = _FromStage(self, path, first)
        return self._from_stage[first]

    def run_from(self, first: int, image: Optional[np.ndarray] = None) -> np.ndarray:
        """The logits [K - first + 1, C] of exits first..K (1-based), stages before
        ``first`` having run on this image (``run_stage``); first = 1 takes ``image``."""
        if first == self.num_exits:
            return self.run_stage(first - 1, image)[None]
        return self.from_stage(first).run(image)

    def route_timings(self) -> "RouteTimings":
        """What each call of a route costs here: the manifest's timings where they were taken
        on a host like this one (CPU model, cores, threads setting), else timed now, once."""
        if self._timings is None:
            recorded = self.manifest["precisions"][self.precision].get("routes", {})
            if recorded.get("timings", {}).get("host") == this_host(self._num_threads):
                self._timings = RouteTimings.from_json(recorded["timings"])
            else:
                logging.info("timing the routes of %s (%s) on this host", self._export_dir,
                             self.precision)
                self._timings = time_routes(self)
        return self._timings

    @property
    def routes(self) -> List[int]:
        """The switch stages this export can run: 1..K where each from-stage file exists."""
        return [s for s in range(1, self.num_exits + 1)
                if s == self.num_exits or self.from_stage(s) is not None]

    def exits_up_to(self, image: np.ndarray, k: int) -> np.ndarray:
        """The logits [k, C] of exits 1..k for one image: the one-graph file where the export
        has it, else the stages in turn."""
        one_graph = self.up_to_exit(k)
        if one_graph is not None:
            return one_graph.logits(image)[:, 0]
        return np.stack([self.run_stage(j, image) for j in range(k)])

    def every_exit(self, image: np.ndarray) -> np.ndarray:
        """Every exit's logits [K, C] for one image: ``exits_up_to`` the last exit (the
        batch-1 one-graph file where the export has it; one stage: its stage file)."""
        return self.exits_up_to(image, self.num_exits)

    def all_exit_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of every exit for every image, float32 [K, N, C]: the batched one-graph
        file where the export has one (many images per call), else one image at a time."""
        batched = max(self._all_exits_paths, default=1)
        if batched > 1:
            return self.all_exits(batched).logits(images)
        logits = np.empty((self.num_exits, len(images), self.num_classes), np.float32)
        for i, image in enumerate(images):
            logits[:, i] = self.every_exit(image)
        return logits


class _FromStage:
    """Stages ``first``..K (1-based) of an export in one file, fed from the stage files'
    output buffers (first = 1: from the pixels)."""

    def __init__(self, stages: LiteRTStages, path: str, first: int):
        self.interpreter, self.num_threads = _interpreter(path, stages._num_threads)
        runner = self.interpreter.get_signature_runner(SIGNATURE)
        inputs = {name: d["index"] for name, d in runner.get_input_details().items()}
        outputs = {name: d["index"] for name, d in runner.get_output_details().items()}
        del runner  # it holds the interpreter; allocate and invoke without it
        self.interpreter.allocate_tensors()
        self._image_shape = stages.image_shape
        self._image = self.interpreter.tensor(inputs[IMAGES]) if IMAGES in inputs else None
        self._copies = stages._feeds(self.interpreter, inputs, first - 1)
        self._logits = [self.interpreter.tensor(outputs[exit_logits_name(k)])
                        for k in range(first - 1, stages.num_exits)]

    def run(self, image: Optional[np.ndarray] = None) -> np.ndarray:
        if self._image is not None:
            np.copyto(self._image(), np.reshape(image, self._image_shape), casting="unsafe")
        for destination, source in self._copies:
            np.copyto(destination(), source())
        self.interpreter.invoke()
        return np.stack([logits()[0] for logits in self._logits])


# A route is the switch stage s: stages 1..s-1 run one file each, an image leaving at the first
# sure exit; an image that reaches stage s runs stages s..K in one call and leaves at the
# first sure exit among them. s = K is the stage-by-stage loop; s = 1 the one-graph file with
# the answer picked afterwards. Every route gives the same answers (the files are cut from one
# graph); which is fastest depends on where images leave and what each call costs here.
_ROUTE_ROUNDS, _ROUTE_WARMUP = 31, 3


@dataclasses.dataclass(frozen=True)
class RouteTimings:
    """Median milliseconds per image of each call a route makes, on one host.

    Attributes:
        host: what the times depend on: the CPU model, its cores, the threads setting.
        stage_ms: each stage file, fed from the stages before it, and its softmax.
        from_stage_ms: first (1-based, every route but K) -> the from-stage file and the
            softmax of its exits.
    """
    host: dict
    stage_ms: List[float]
    from_stage_ms: Dict[int, float]

    def to_json(self) -> dict:
        return {"host": self.host, "stage_ms": self.stage_ms,
                "from_stage_ms": {str(s): ms for s, ms in self.from_stage_ms.items()}}

    @classmethod
    def from_json(cls, entry: dict) -> "RouteTimings":
        return cls(entry["host"], [float(ms) for ms in entry["stage_ms"]],
                   {int(s): float(ms) for s, ms in entry["from_stage_ms"].items()})


def this_host(num_threads: Threads) -> dict:
    """The facts route timings depend on, as ``RouteTimings.host`` records them."""
    return {"cpu": host.cpu_name(), "cores": os.cpu_count(),
            "threads": "default" if num_threads is None else num_threads}


def time_routes(stages: LiteRTStages) -> RouteTimings:
    """Times every call a route can make, in the order early exit makes them: each round runs
    the stages in turn, then each from-stage file after the stages before it."""
    image = np.zeros(stages.image_shape, np.float32)
    firsts = [s for s in stages.routes if s != stages.num_exits]
    stage_seconds = np.empty((_ROUTE_ROUNDS, stages.num_exits))
    from_seconds = np.empty((_ROUTE_ROUNDS, len(firsts)))
    for round_ in range(-_ROUTE_WARMUP, _ROUTE_ROUNDS):
        for k in range(stages.num_exits):
            started = time.perf_counter()
            softmax(stages.run_stage(k, image))
            stage_seconds[round_, k] = time.perf_counter() - started
        for column, first in enumerate(firsts):
            for k in range(first - 1):  # untimed: the features this file reads
                stages.run_stage(k, image)
            started = time.perf_counter()
            softmax(stages.run_from(first, image))
            from_seconds[round_, column] = time.perf_counter() - started
    stage_ms = [float(ms) for ms in 1e3 * np.median(stage_seconds, axis=0)]
    from_ms = 1e3 * np.median(from_seconds, axis=0)
    return RouteTimings(this_host(stages._num_threads), stage_ms,
                        {first: float(ms) for first, ms in zip(firsts, from_ms)})


def expected_route_ms(exit_fractions: Sequence[float], timings: RouteTimings,
                      first: int) -> float:
    """The mean time per image of route ``first`` for images leaving at each exit (1..K) in
    these fractions: stage k runs for the images not out before it, the from-stage file for
    those that reach stage ``first``."""
    fractions = np.asarray(exit_fractions, np.float64)
    reach = np.cumsum(fractions[::-1])[::-1]  # reach[k]: the images that get to exit k + 1
    num_exits = len(fractions)
    last = (timings.stage_ms[num_exits - 1] if first == num_exits
            else timings.from_stage_ms[first])
    return float(np.dot(reach[:first - 1], timings.stage_ms[:first - 1]) + reach[first - 1] * last)


def choose_route(exit_fractions: Sequence[float], timings: RouteTimings,
                 routes: Sequence[int]) -> Tuple[int, Dict[int, float]]:
    """(the route of ``routes`` with the least expected time, every route's expected ms)."""
    expected = {first: expected_route_ms(exit_fractions, timings, first) for first in routes}
    return min(expected, key=lambda first: (expected[first], -first)), expected


class LiteRTPredictor:
    """Early exit on ``LiteRTStages``: no stage runs once an exit before it was sure.

    Args:
        stages: the interpreters of one precision.
        thresholds: one per exit on the manifest's confidence scale, or the name of a set the
            manifest holds for this precision: "default", "fixed", or a budget in million
            multiply-adds ("20", "1681.234"), matched by its number.
        exit_fractions: where images leave at these thresholds (validation images), to choose
            the route from; a named set brings its own from the manifest.
        route: the switch stage to run (1..K, see ``RouteTimings``); default: the fastest
            route for ``exit_fractions`` on this host's ``stages.route_timings()``, or stage
            by stage (K) where no fractions are known.
    """

    def __init__(self, stages: LiteRTStages, thresholds: Union[str, Sequence[float]] = "default",
                 exit_fractions: Optional[Sequence[float]] = None, route: Optional[int] = None):
        self.stages = stages
        self.confidence_kind = stages.manifest["confidence"]
        if isinstance(thresholds, str):
            thresholds, recorded = self._named(thresholds)
            exit_fractions = recorded if exit_fractions is None else exit_fractions
        self.thresholds = [float(t) for t in thresholds]
        if len(self.thresholds) != stages.num_exits:
            raise ValueError(f"thresholds needs one value per exit ({stages.num_exits}). "
                             f"Received: thresholds={self.thresholds}")
        self._threshold_array = np.asarray(self.thresholds)
        self.expected_ms: Dict[int, float] = {}
        if route is not None:
            if route not in stages.routes:
                raise UsageError(f"route must be one of {stages.routes} (the switch stages "
                                 f"this export has files for). Received: route={route!r}")
        elif exit_fractions is not None and len(stages.routes) > 1:
            route, self.expected_ms = choose_route(exit_fractions, stages.route_timings(),
                                                   stages.routes)
        else:
            route = stages.num_exits
        self.route = route

    def _named(self, name: str) -> Tuple[List[float], Optional[List[float]]]:
        """(thresholds, exit fractions on the validation images or None) of a named set."""
        entry = self.stages.manifest["precisions"][self.stages.precision]
        sets = entry["thresholds"]
        recorded = entry.get("routes", {}).get("points", {})
        budgets = {float(budget): values for budget, values in sets["budgets"].items()}
        if name in sets and name != "budgets":
            return sets[name], recorded.get(name, {}).get("exit_fractions")
        try:
            budget = points.find_budget(name, budgets)
        except KeyError:
            named = [k for k in sets if k != "budgets"] + list(sets["budgets"])
            raise UsageError(f"thresholds must be one of {', '.join(named)} (what the manifest "
                             f"holds; a budget by its number). Received: thresholds={name!r}"
                             ) from None
        key = next(key for key in sets["budgets"] if float(key) == budget)
        return budgets[budget], recorded.get("budgets", {}).get(key, {}).get("exit_fractions")

    def predict(self, image: np.ndarray) -> Tuple[int, int, np.ndarray]:
        """(class, exit (1-based), softmax of that exit) for one image of raw pixels."""
        stages, first, kind = self.stages, self.route, self.confidence_kind
        for k in range(first - 1):
            probabilities = softmax(stages.run_stage(k, image))
            if confidence(probabilities, kind) >= self.thresholds[k]:
                return int(np.argmax(probabilities)), k + 1, probabilities
        probabilities = softmax(stages.run_from(first, image))
        sure = confidence(probabilities, kind) >= self._threshold_array[first - 1:]
        sure[-1] = True  # the last exit takes every image still undecided
        j = int(np.argmax(sure))
        return int(np.argmax(probabilities[j])), first + j, probabilities[j]

    def predict_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """``predict`` over images [N, H, W, 3]: {"classes", "exits", "probabilities"}."""
        answers = [self.predict(image) for image in images]
        return {"classes": np.array([a[0] for a in answers], np.int32),
                "exits": np.array([a[1] for a in answers], np.int32),
                "probabilities": np.stack([a[2] for a in answers])}
