"""A load generator for a TF Serving-compatible REST endpoint: open loop, latency from due time.

    python -m ranet.serve --model=ranet=/tmp/ranet_litert &          # or TF Serving itself
    python -m ranet.bench.serve --url=http://127.0.0.1:8501 --model=ranet \\
        --data_dir=../shared/data --sweep --slo_p99_ms=10 --json=/tmp/serve.json \\
        --plot=/tmp/serve.png

Every request is ``POST {url}/v1/models/{model}:predict`` with one real test image in TF
Serving's row format, ``{"instances": [image]}``: the raw pixels 0..255 as nested lists
(``--encoding=json``) or ``{"instances": [{"b64": "<H*W*3 uint8 bytes>"}]}`` (``b64``). Every
body is encoded before the run starts, so the generator spends its time sending.

The method (docs/serving_bench.md says more):

* Open loop. Requests are due at Poisson arrival times of ``--rate`` per second (exponential
  gaps, seeded), whatever the server does; a request is sent when it is due, on one of up to
  ``--connections`` keep-alive connections (asyncio + aiohttp), never after the previous one
  answered. A closed loop (wrk, locust's users) sends less while the server is slow and so
  never sees the queue it would have built: coordinated omission.
* Latency is measured from the moment a request was due, not from when it was sent: if the
  server stalls, or the generator itself falls behind, or every connection is busy, the
  wait is in the number (wrk2's correction). How far the generator fell behind (send time
  minus due time) and the most requests in flight are reported per rate, with the
  generator's own CPU time per request.
* Each rate runs ``--warmup`` seconds that are not counted, then ``--duration`` seconds whose
  requests (by due time) are counted. Latency percentiles are over the counted requests that
  got an answer (HTTP 200 whose body names a class); the others are errors, counted by
  HTTP status, ``connection`` (refused, reset), ``timeout`` (no answer within ``--timeout``)
  and ``bad_answer`` (200 whose body names no class). Percentiles are observed values (the
  smallest latency that at least that share of answers did not exceed), never interpolated.
* The achieved rate is the answers the server gave during the counted window per second;
  accuracy is the share of answers whose class (``classes``, or the argmax of the
  predictions) is the image's label; the exit distribution counts ``exits`` where the
  answer has it.
* The objective (MLPerf's server scenario): a rate meets ``--slo_p99_ms`` when the p99
  latency of its counted requests is at most that many milliseconds and at most
  ``--max_error_rate`` of them failed. The reported capacity is the highest rate tried
  that meets it below the lowest rate tried that does not (a noisy pass above a failure
  does not count). ``--sweep`` finds it: ``--start_rate``, times ``--sweep_factor`` until a
  rate fails (or ``--max_rate``), then ``--refine`` bisections between the last pass and
  the first failure.

``--stub_port`` serves a stub instead, one that answers every request at once with a fixed
prediction: run against it, the generator measures itself (the highest rate it sustains,
and its latency floor on this host).
"""

import asyncio
import base64
import dataclasses
import datetime
import gc
import json
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from ranet import cli, host, jsonio
from ranet.errors import UsageError

ENCODINGS = ("json", "b64")
DATASETS = ("cifar10", "cifar100", "synthetic")
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
# Outcomes of a request that got no HTTP answer, as negative status codes.
CONNECTION_ERROR, TIMEOUT, UNFINISHED = -1, -2, -3
_ERROR_NAMES = {CONNECTION_ERROR: "connection", TIMEOUT: "timeout", UNFINISHED: "timeout"}
BAD_ANSWER = "bad_answer"
# The stub's answer: what our server and TF Serving answer for one image of a model with
# several outputs (a row of named outputs).
STUB_ANSWER = b'{"predictions": [{"classes": 3, "exits": 1}]}'
# The generator is behind when the p99 of (send time - due time) is above this.
_BEHIND_MS = 5.0
# Time 0 of a run is this long after it is set up: time to create the first tasks.
_LEAD_S = 0.02


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_string("url", "http://127.0.0.1:8501", "The server's REST root (TF "
                        "Serving's REST port is 8501).", **define)
    flags.DEFINE_string("model", None, "The model's name on the server: requests go to "
                        "{url}/v1/models/{model}:predict.", **define)
    flags.DEFINE_string("signature_name", None, "Sent as the body's signature_name; default "
                        "the server's (serving_default).", **define)
    flags.DEFINE_enum("encoding", "json", list(ENCODINGS), "How an image travels: json, "
                      "the pixels as nested lists of numbers; b64, {\"b64\": raw uint8 "
                      "H*W*3 bytes in base64}.", **define)
    flags.DEFINE_float("rate", None, "One rate to offer, requests per second (Poisson "
                       "arrivals).", lower_bound=0, **define)
    flags.DEFINE_list("rates", None, "Rates to offer one after another, e.g. 50,100,200.",
                      **define)
    flags.DEFINE_bool("sweep", False, "Raise the rate from --start_rate by --sweep_factor "
                      "until it breaks --slo_p99_ms, then bisect --refine times.", **define)
    flags.DEFINE_float("start_rate", 10.0, "--sweep: the first rate.", lower_bound=0,
                       **define)
    flags.DEFINE_float("sweep_factor", 2.0, "--sweep: each rate is the last one times this.",
                       lower_bound=1, **define)
    flags.DEFINE_integer("refine", 2, "--sweep: bisections between the highest rate that "
                         "met the objective and the lowest that did not.", lower_bound=0,
                         **define)
    flags.DEFINE_float("max_rate", 5000.0, "--sweep: never offer more than this.",
                       lower_bound=0, **define)
    flags.DEFINE_float("slo_p99_ms", None, "The objective: p99 latency (from due time) at "
                       "most this many ms, with at most --max_error_rate failures.",
                       lower_bound=0, **define)
    flags.DEFINE_float("max_error_rate", 0.001, "The share of failed requests a rate may "
                       "have and still meet the objective.", lower_bound=0, upper_bound=1,
                       **define)
    flags.DEFINE_float("duration", 10.0, "Counted seconds per rate.", lower_bound=0,
                       **define)
    flags.DEFINE_float("warmup", 2.0, "Seconds of load before each counted window, not "
                       "counted.", lower_bound=0, **define)
    flags.DEFINE_float("pause", 1.0, "Idle seconds between two rates, for the server to "
                       "drain.", lower_bound=0, **define)
    flags.DEFINE_integer("connections", 1024, "Most connections open at once; more than "
                         "are ever in flight, so that no due request waits for one (the "
                         "table says when all were busy).", lower_bound=1, **define)
    flags.DEFINE_float("timeout", 10.0, "Seconds a request may take before it counts as a "
                       "timeout.", lower_bound=0, **define)
    flags.DEFINE_enum("dataset", "cifar10", list(DATASETS), "Whose test images to send "
                      "(synthetic: random class prototypes, for trying the generator).",
                      **define)
    flags.DEFINE_string("data_dir", None, "Folder holding cifar-10-batches-py (or that "
                        "folder), as ranet.train takes it.", **define)
    flags.DEFINE_integer("test_size", 10000, "Where the data folder has no test file: "
                         "training images held out as the test split, as ranet.eval "
                         "--test_size does (same seed, same images).", lower_bound=1,
                         **define)
    flags.DEFINE_integer("images", 0, "Send a class-balanced sample of this many test "
                         "images (0: all), in a seeded random order, repeated as needed.",
                         lower_bound=0, **define)
    flags.DEFINE_integer("seed", 0, "Seed of the arrival times and the image order.",
                         **define)
    flags.DEFINE_string("json", None, "Also write every rate's numbers here.", **define)
    flags.DEFINE_string("plot", None, "Also draw p50/p99 latency against offered rate "
                        "here (a PNG).", **define)
    flags.DEFINE_integer("stub_port", 0, "Instead of generating load, serve the stub "
                         "(answers every request at once) on 127.0.0.1 at this port.",
                         lower_bound=0, **define)


# --------------------------------------------------------------------------------------------
# What is sent.

@dataclasses.dataclass(frozen=True)
class Target:
    """A TF Serving-compatible REST endpoint and the model asked."""
    url: str
    model: str

    @property
    def predict_url(self) -> str:
        return f"{self.url.rstrip('/')}/v1/models/{self.model}:predict"

    @property
    def status_url(self) -> str:
        return f"{self.url.rstrip('/')}/v1/models/{self.model}"


@dataclasses.dataclass(frozen=True)
class Workload:
    """Request bodies, encoded once, and the label of the image each one carries."""
    bodies: Tuple[bytes, ...]
    labels: np.ndarray
    source: str = ""

    def __post_init__(self):
        if not self.bodies or len(self.bodies) != len(self.labels):
            raise ValueError(f"a workload needs one label per body and at least one body. "
                             f"Received: {len(self.bodies)} bodies, {len(self.labels)} labels")


def encode_body(image: np.ndarray, encoding: str, signature_name: Optional[str] = None) -> bytes:
    """One image (uint8 [H, W, C]) as a TF Serving ``:predict`` body in row format."""
    if encoding == "json":
        instance = image.tolist()
    elif encoding == "b64":
        instance = {"b64": base64.b64encode(np.ascontiguousarray(image, np.uint8).tobytes())
                    .decode("ascii")}
    else:
        raise UsageError(f"--encoding must be one of {', '.join(ENCODINGS)}. "
                         f"Received: {encoding!r}")
    body = {"instances": [instance]}
    if signature_name:
        body = {"signature_name": signature_name, **body}
    return json.dumps(body, separators=(",", ":")).encode()


def make_workload(images: np.ndarray, labels: np.ndarray, encoding: str,
                  signature_name: Optional[str] = None, source: str = "") -> Workload:
    return Workload(tuple(encode_body(image, encoding, signature_name) for image in images),
                    np.asarray(labels, np.int64), source)


def load_test_images(dataset: str, data_dir: Optional[str], test_size: int, images: int,
                     seed: int) -> Tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images [N, H, W, 3], labels, where they come from): the test split that
    ``ranet.eval`` reports on, from ``ranet.data`` (which imports TensorFlow, hence here).

    A folder without CIFAR's test file (the shared copy) gives ``test_size`` training
    images held out as ``--test_size`` holds them out everywhere else: the same images.
    """
    from ranet import config as config_lib
    from ranet import data

    where = "its test split"
    if dataset == "synthetic":
        splits = data.load_splits(config_lib.DataConfig(
            dataset=dataset, validation_size=0, synthetic_test_size=images or 512))
    elif not data_dir:
        raise UsageError(f"--dataset={dataset} needs --data_dir (the folder holding "
                         "cifar-10-batches-py); --dataset=synthetic needs none")
    else:
        config = config_lib.DataConfig(dataset=dataset, data_dir=data_dir)
        try:  # Most folders here have no test file (the shared copy): try that first.
            splits = data.load_splits(dataclasses.replace(config, test_size=test_size))
            where = (f"no test file, {test_size} training images held out (--test_size, "
                     f"split seed {config.split_seed + 1})")
        except data.DataError:  # It has one (or something else is wrong: said again).
            splits = data.load_splits(config)
    test = splits.test
    mask = data.sample_mask(test.labels, images, splits.num_classes, seed)
    return (test.images[mask], test.labels[mask],
            f"{splits.source}: {where}, {int(mask.sum())} images")


# --------------------------------------------------------------------------------------------
# When requests are due, and what came back.

def poisson_schedule(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Due times (seconds from the start, increasing) of Poisson arrivals at ``rate``/s."""
    if rate <= 0:
        raise UsageError(f"a rate must be above 0 requests/s. Received: {rate}")
    rng = np.random.default_rng(seed)
    expected = rate * seconds
    count = int(expected + 6 * np.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, count))
    while times[-1] < seconds:  # A very unlikely shortfall: draw on.
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate,
                                                                             count))])
    return times[times < seconds]


@dataclasses.dataclass
class Outcomes:
    """What happened to every request of one run, times in seconds from the run's start.

    ``status``: the HTTP status, or ``CONNECTION_ERROR`` / ``TIMEOUT`` / ``UNFINISHED``.
    """
    due: np.ndarray
    sent: np.ndarray
    done: np.ndarray
    status: np.ndarray
    image: np.ndarray
    answers: List[Optional[bytes]]
    max_in_flight: int = 0
    cpu_seconds: float = 0.0
    start: float = 0.0  # The clock's reading at time 0.

    @classmethod
    def empty(cls, due: np.ndarray, image: np.ndarray) -> "Outcomes":
        n = len(due)
        return cls(due=due, sent=np.full(n, np.nan), done=np.full(n, np.nan),
                   status=np.full(n, UNFINISHED, np.int32), image=image, answers=[None] * n)


def parse_answer(content: Optional[bytes]) -> Tuple[Optional[int], Optional[int]]:
    """(class, exit) of a ``:predict`` answer for one instance; None where it has none.

    Rows (``{"predictions": [...]}``) or columns (``{"outputs": ...}``); an instance's
    answer is a row of named outputs (``classes`` or else the argmax of ``probabilities`` /
    ``logits`` / ``predictions``, and ``exits``), a list of scores (argmax), or a class.
    """
    try:
        answer = json.loads(content)
        rows = answer.get("predictions", answer.get("outputs"))
        if isinstance(rows, dict):  # Columns: the first instance of every output.
            row = {name: value[0] for name, value in rows.items()}
        else:
            row = rows[0]
        exit_number = None
        if isinstance(row, dict):
            exit_number = row.get("exits")
            if "classes" in row:
                row = row["classes"]
            else:
                row = next(row[name] for name in ("probabilities", "logits", "predictions",
                                                  "scores") if name in row)
        if isinstance(row, list) and row and isinstance(row[0], list):
            row = row[0]  # Scores with a batch dimension of one.
        if isinstance(row, list):  # Scores, or one class in a list.
            label = int(row[0]) if len(row) == 1 else int(np.argmax(row))
        else:
            label = int(row)
        if isinstance(exit_number, list):
            exit_number = exit_number[0]
        return label, None if exit_number is None else int(exit_number)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return None, None


def observed_percentile(values: np.ndarray, q: float) -> float:
    """The smallest observed value that at least ``q`` % of ``values`` do not exceed."""
    return float(np.percentile(values, q, method="inverted_cdf"))


@dataclasses.dataclass(frozen=True)
class RateResult:
    """One rate's numbers (see the module docstring for what each means)."""
    rate: float
    offered_rate: float
    achieved_rate: float
    requests: int
    answered: int
    errors: Dict[str, int]
    error_rate: float
    latency_ms: Optional[Dict[str, float]]
    accuracy: Optional[float]
    exits: Optional[Dict[str, float]]
    lag_ms: Dict[str, float]
    max_in_flight: int
    connections: int
    generator_cpu_ms_per_request: float

    def meets(self, slo_p99_ms: float, max_error_rate: float) -> bool:
        """The objective: p99 within ``slo_p99_ms`` and failures within ``max_error_rate``."""
        return (self.requests > 0 and self.latency_ms is not None
                and self.latency_ms["p99"] <= slo_p99_ms and self.error_rate <= max_error_rate)

    @property
    def waited_for_connections(self) -> bool:
        """Whether every connection was busy at some point (due requests may have waited)."""
        return self.max_in_flight >= self.connections

    def to_json(self) -> dict:
        content = dataclasses.asdict(self)
        content["waited_for_connections"] = self.waited_for_connections
        return content


def summarize(outcomes: Outcomes, labels: np.ndarray, rate: float, warmup: float,
              duration: float, connections: int) -> RateResult:
    """One rate's numbers from what happened to its requests.

    Counted: the requests due in ``[warmup, warmup + duration)``. Latency runs from due time
    to the answer's last byte.
    """
    end = warmup + duration
    counted = np.flatnonzero((outcomes.due >= warmup) & (outcomes.due < end))
    errors: Dict[str, int] = {}
    latencies, correct, exits = [], 0, []
    for i in counted:
        status = int(outcomes.status[i])
        if status == 200:
            label, exit_number = parse_answer(outcomes.answers[i])
            if label is None:
                errors[BAD_ANSWER] = errors.get(BAD_ANSWER, 0) + 1
                continue
            latencies.append(outcomes.done[i] - outcomes.due[i])
            correct += label == int(labels[outcomes.image[i]])
            if exit_number is not None:
                exits.append(exit_number)
        else:
            name = _ERROR_NAMES.get(status, str(status))
            errors[name] = errors.get(name, 0) + 1
    latencies = 1e3 * np.asarray(latencies)
    latency_ms = None
    if len(latencies):
        latency_ms = {name: observed_percentile(latencies, q) for name, q in PERCENTILES}
        latency_ms.update(mean=float(latencies.mean()), max=float(latencies.max()))
    answered_in_window = np.sum((outcomes.status == 200) & (outcomes.done >= warmup)
                                & (outcomes.done < end))
    lag = 1e3 * (outcomes.sent[counted] - outcomes.due[counted])
    lag = lag[np.isfinite(lag)]
    exit_shares = None
    if exits:
        values, counts = np.unique(exits, return_counts=True)
        exit_shares = {str(v): float(c) / len(exits) for v, c in zip(values, counts)}
    sent = int(np.isfinite(outcomes.sent).sum())
    return RateResult(
        rate=float(rate), offered_rate=len(counted) / duration if duration else 0.0,
        achieved_rate=float(answered_in_window) / duration if duration else 0.0,
        requests=len(counted), answered=len(latencies),
        errors=dict(sorted(errors.items())),
        error_rate=sum(errors.values()) / len(counted) if len(counted) else 0.0,
        latency_ms=latency_ms,
        accuracy=correct / len(latencies) if len(latencies) else None,
        exits=exit_shares,
        lag_ms={"p50": observed_percentile(lag, 50), "p99": observed_percentile(lag, 99),
                "max": float(lag.max())} if len(lag) else {"p50": 0.0, "p99": 0.0, "max": 0.0},
        max_in_flight=int(outcomes.max_in_flight), connections=connections,
        generator_cpu_ms_per_request=1e3 * outcomes.cpu_seconds / sent if sent else 0.0)


# --------------------------------------------------------------------------------------------
# Which rate next.

class RateSearch:
    """The rates a sweep offers: up by ``factor`` from ``start`` until one fails the
    objective (or ``max_rate`` is reached), then ``refine`` bisections between the highest
    rate that met it and the lowest that did not. A pure object: ``record`` what a rate
    did, ask ``next_rate`` (None: done)."""

    def __init__(self, start: float, factor: float, refine: int, max_rate: float):
        if start <= 0 or factor <= 1 or max_rate < start:
            raise UsageError(f"a sweep needs 0 < --start_rate <= --max_rate and "
                             f"--sweep_factor > 1. Received: start_rate={start}, "
                             f"sweep_factor={factor}, max_rate={max_rate}")
        self.start, self.factor, self.refine, self.max_rate = start, factor, refine, max_rate
        self.tried: Dict[float, bool] = {}
        self._bisections = 0

    def record(self, rate: float, met: bool) -> None:
        self.tried[rate] = met

    def capacity(self) -> Optional[float]:
        """The highest rate that met the objective below the lowest that did not."""
        return self._highest_pass_lowest_fail()[0]

    def _highest_pass_lowest_fail(self):
        passed = [r for r, met in self.tried.items() if met]
        failed = [r for r, met in self.tried.items() if not met]
        lowest_fail = min(failed) if failed else None
        below = [r for r in passed if lowest_fail is None or r < lowest_fail]
        return (max(below) if below else None), lowest_fail

    def next_rate(self) -> Optional[float]:
        if not self.tried:
            return self.start
        highest_pass, lowest_fail = self._highest_pass_lowest_fail()
        if lowest_fail is None:  # Still climbing.
            rate = min(max(self.tried) * self.factor, self.max_rate)
            return None if rate in self.tried else round(rate, 3)
        if highest_pass is None or self._bisections >= self.refine:
            return None
        rate = round((highest_pass + lowest_fail) / 2, 3)
        if rate in self.tried or rate in (highest_pass, lowest_fail):
            return None
        self._bisections += 1
        return rate


def highest_rate_meeting(results: Sequence[RateResult], slo_p99_ms: float,
                         max_error_rate: float) -> Optional[float]:
    """The highest rate that met the objective below the lowest rate that did not."""
    search = RateSearch(1.0, 2.0, 0, float("inf"))
    for result in results:
        search.record(result.rate, result.meets(slo_p99_ms, max_error_rate))
    return search.capacity()


# --------------------------------------------------------------------------------------------
# Sending.

@dataclasses.dataclass(frozen=True)
class LoadSettings:
    duration: float = 10.0
    warmup: float = 2.0
    connections: int = 1024
    timeout: float = 10.0
    pause: float = 1.0
    seed: int = 0


def _session(settings: LoadSettings):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=settings.connections,
                                     limit_per_host=settings.connections, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=settings.timeout),
                                 skip_auto_headers=("User-Agent",), auto_decompress=False)


_HEADERS = {"Content-Type": "application/json"}


def _states(text: str) -> List[str]:
    """The version states of a TF Serving status page ([] where it is not one)."""
    try:
        return [str(version.get("state")) for version in
                json.loads(text).get("model_version_status", [])]
    except (ValueError, AttributeError):
        return []


async def check_model(session, target: Target, wait_s: float = 60.0,
                      progress: Callable[[str], None] = None) -> None:
    """A ``UsageError`` saying what is wrong when the server cannot be reached or has no
    such model; waits up to ``wait_s`` for a model still loading to be AVAILABLE (a server
    without TF Serving's status page passes)."""
    import aiohttp

    waited_since = time.monotonic()
    while True:
        try:
            async with session.get(target.status_url) as response:
                text = await response.text()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
            raise UsageError(f"cannot reach {target.url} ({type(error).__name__}: {error}). "
                             "Start the server, or fix --url.") from None
        if response.status == 404:
            raise UsageError(f"the server at {target.url} has no model {target.model!r} "
                             f"(HTTP 404 from {target.status_url}: {text.strip()[:300]}). "
                             "Fix --model or the server's models.")
        states = _states(text)
        if not states or "AVAILABLE" in states:
            return
        if time.monotonic() - waited_since > wait_s:
            raise UsageError(f"model {target.model!r} at {target.url} is not AVAILABLE after "
                             f"{wait_s:g} s (states: {', '.join(states)}). Wait for the "
                             "server to load it, or check its log.")
        if progress:
            progress(f"model {target.model!r} is {'/'.join(states)}; waiting for AVAILABLE")
        await asyncio.sleep(1.0)


async def check_predict(session, target: Target, body: bytes) -> None:
    """A ``UsageError`` saying what is wrong unless one request is answered with a class."""
    import aiohttp

    try:
        async with session.post(target.predict_url, data=body, headers=_HEADERS) as response:
            text = await response.text()
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
        raise UsageError(f"a first request to {target.predict_url} failed ("
                         f"{type(error).__name__}: {error}). Start the server, or fix "
                         "--url.") from None
    if response.status != 200:
        raise UsageError(f"the server refused a first request (HTTP {response.status} from "
                         f"{target.predict_url}: {text.strip()[:300]}). Check --model, "
                         "--encoding and --signature_name.")
    if parse_answer(text.encode())[0] is None:
        raise UsageError(f"the answer of {target.predict_url} names no class: "
                         f"{text.strip()[:300]}. Expected TF Serving's {{\"predictions\": "
                         "[...]}} with classes or scores.")


async def check_reachable(target: Target, settings: "LoadSettings") -> None:
    async with _session(settings) as session:
        await check_model(session, target, progress=_progress)


async def run_rate(session, target: Target, workload: Workload, rate: float,
                   settings: LoadSettings, seed: int,
                   clock: Callable[[], float] = time.monotonic) -> Outcomes:
    """Offers ``rate`` for ``warmup + duration`` seconds and waits for the answers.

    The schedule loop wakes when the next request is due and starts every request due by
    then as a task of its own; it never waits for an answer or a connection (a request
    that finds every connection busy waits in its own task, inside its latency, and
    ``max_in_flight`` shows it). The garbage collector is off meanwhile: a full collection
    walks every object of the process, TensorFlow's once the data is read (0.5 s on a
    loaded 2-core host), and nothing is sent while it runs; a run's garbage is small.
    """
    import aiohttp

    due = poisson_schedule(rate, settings.warmup + settings.duration, seed)
    order = np.random.default_rng([seed, 1]).permutation(len(workload.bodies))
    image = order[np.arange(len(due)) % len(order)]
    outcomes = Outcomes.empty(due, image)
    in_flight = 0
    url, bodies = target.predict_url, workload.bodies

    async def send(i: int) -> None:
        nonlocal in_flight
        outcomes.sent[i] = clock() - start
        in_flight += 1
        outcomes.max_in_flight = max(outcomes.max_in_flight, in_flight)
        try:
            async with session.post(url, data=bodies[image[i]], headers=_HEADERS) as response:
                outcomes.answers[i] = await response.read()
                outcomes.status[i] = response.status
        except asyncio.TimeoutError:
            outcomes.status[i] = TIMEOUT
        except aiohttp.ClientError:
            outcomes.status[i] = CONNECTION_ERROR
        finally:
            outcomes.done[i] = clock() - start
            in_flight -= 1

    loop = asyncio.get_running_loop()
    tasks = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        cpu_started = time.process_time()
        start = outcomes.start = clock() + _LEAD_S
        next_request = 0
        while next_request < len(due):
            now = clock() - start
            while next_request < len(due) and due[next_request] <= now:
                tasks.append(loop.create_task(send(next_request)))
                next_request += 1
            if next_request < len(due):
                await asyncio.sleep(due[next_request] - (clock() - start))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=settings.timeout + 1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        outcomes.cpu_seconds = time.process_time() - cpu_started
    finally:
        if collecting:
            gc.enable()  # Its next collection runs between rates.
    return outcomes


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure(target: Target, workload: Workload, rates: Sequence[float],
                  settings: LoadSettings, search: Optional[RateSearch] = None,
                  slo_p99_ms: Optional[float] = None, max_error_rate: float = 0.0,
                  progress: Callable[[str], None] = _progress,
                  before_rate: Callable[[float], None] = lambda rate: None
                  ) -> List[RateResult]:
    """Every rate of ``rates`` in turn, then those ``search`` asks for (which needs the
    objective), checking the endpoint first; ``before_rate(rate)`` runs before each."""
    results = []
    async with _session(settings) as session:
        await check_model(session, target, progress=progress)
        await check_predict(session, target, workload.bodies[0])
        pending = list(rates)
        index = 0
        while True:
            if pending:
                rate = pending.pop(0)
            elif search is not None:
                rate = search.next_rate()
                if rate is None:
                    break
            else:
                break
            if results and settings.pause:
                await asyncio.sleep(settings.pause)
            before_rate(rate)
            progress(f"rate {rate:g}/s: {settings.warmup:g} s warm-up, then "
                     f"{settings.duration:g} s counted")
            outcomes = await run_rate(session, target, workload, rate, settings,
                                      settings.seed + index)
            result = summarize(outcomes, workload.labels, rate, settings.warmup,
                               settings.duration, settings.connections)
            index += 1
            results.append(result)
            if search is not None:
                search.record(rate, result.meets(slo_p99_ms, max_error_rate))
            progress("  " + _row(result, slo_p99_ms, max_error_rate))
    return results


# --------------------------------------------------------------------------------------------
# The stub server.

def stub_app(answer: bytes = STUB_ANSWER, model: Optional[str] = None):
    """An aiohttp application that answers every ``:predict`` at once with ``answer`` (and
    every model's status as available); ``model`` set, other names get a 404."""
    from aiohttp import web

    status = json.dumps({"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}).encode()

    def known(request) -> bool:
        return model is None or request.match_info["model"] == model

    async def model_status(request):
        if not known(request):
            return web.Response(status=404, body=b'{"error": "no such model"}',
                                content_type="application/json")
        return web.Response(body=status, content_type="application/json")

    async def predict(request):
        await request.read()
        if not known(request):
            return web.Response(status=404, body=b'{"error": "no such model"}',
                                content_type="application/json")
        return web.Response(body=answer, content_type="application/json")

    app = web.Application(client_max_size=16 * 2 ** 20)
    app.router.add_get("/v1/models/{model}", model_status)
    app.router.add_post("/v1/models/{model}:predict", predict)
    return app


def serve_stub(port: int) -> None:
    from aiohttp import web

    _progress(f"stub serving on http://127.0.0.1:{port} (every :predict answers "
              f"{STUB_ANSWER.decode()}); Ctrl-C stops it")
    web.run_app(stub_app(), host="127.0.0.1", port=port, access_log=None, print=None)


# --------------------------------------------------------------------------------------------
# The binary.

def ensure_file_limit(connections: int) -> None:
    """Raises the soft limit on open files to fit ``connections`` sockets, or says how."""
    import resource

    needed = connections + 64  # The interpreter's own files besides.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise UsageError(f"--connections={connections} needs {needed} open files and this "
                             f"process may open {hard} (ulimit -Hn). Pass fewer --connections "
                             "or raise the limit.")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _parse_rates(values: flags.FlagValues) -> List[float]:
    rates = []
    if values.rate is not None:
        rates.append(values.rate)
    try:
        rates += [float(rate) for rate in values.rates or []]
    except ValueError:
        raise UsageError("--rates takes comma-separated numbers (requests per second). "
                         f"Received: --rates={','.join(values.rates)}") from None
    if any(rate <= 0 for rate in rates):
        raise UsageError(f"every rate must be above 0 requests/s. Received: {rates}")
    return rates


def main(values: flags.FlagValues) -> dict:
    if values.stub_port:
        serve_stub(values.stub_port)
        return {}
    if not values.model:
        raise UsageError("pass --model, the model's name on the server (requests go to "
                         "{url}/v1/models/{model}:predict)")
    if not values.url.startswith(("http://", "https://")):
        raise UsageError(f"--url is the server's REST root, like http://127.0.0.1:8501. "
                         f"Received: --url={values.url}")
    rates = _parse_rates(values)
    if not rates and not values.sweep:
        raise UsageError("say what to offer: --rate=R, --rates=R1,R2,... or --sweep "
                         "(with --slo_p99_ms)")
    if values.sweep and values.slo_p99_ms is None:
        raise UsageError("--sweep raises the rate until it breaks the objective: pass "
                         "--slo_p99_ms")
    if values.duration <= 0:
        raise UsageError(f"--duration must be above 0 seconds. Received: {values.duration}")
    search = (RateSearch(values.start_rate, values.sweep_factor, values.refine,
                         values.max_rate) if values.sweep else None)
    settings = LoadSettings(duration=values.duration, warmup=values.warmup,
                            connections=values.connections, timeout=values.timeout,
                            pause=values.pause, seed=values.seed)

    ensure_file_limit(values.connections)
    target = Target(values.url, values.model)
    asyncio.run(check_reachable(target, settings))  # Before the data: that takes seconds.
    images, labels, source = load_test_images(values.dataset, values.data_dir,
                                              values.test_size, values.images, values.seed)
    started = time.perf_counter()
    workload = make_workload(images, labels, values.encoding, values.signature_name, source)
    gc.collect()
    gc.freeze()  # What exists now (TensorFlow's modules, the bodies) is never collected.
    _progress(f"{source}; {len(workload.bodies)} bodies encoded ({values.encoding}, "
              f"{np.mean([len(b) for b in workload.bodies]) / 1e3:.1f} kB each) in "
              f"{time.perf_counter() - started:.1f} s")
    results = asyncio.run(measure(target, workload, rates, settings, search,
                                  values.slo_p99_ms, values.max_error_rate))
    capacity = (highest_rate_meeting(results, values.slo_p99_ms, values.max_error_rate)
                if values.slo_p99_ms is not None else None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": host.cpu_name(),
        "command": shlex.join(["python", "-m", "ranet.bench.serve", *sys.argv[1:]]),
        "url": target.url, "model": target.model, "encoding": values.encoding,
        "images": source, "body_bytes": float(np.mean([len(b) for b in workload.bodies])),
        "settings": dataclasses.asdict(settings),
        "slo_p99_ms": values.slo_p99_ms, "max_error_rate": values.max_error_rate,
        "rule": ("highest offered rate whose p99 latency (from due time) is within "
                 "slo_p99_ms and whose share of failed requests is within max_error_rate, "
                 "below the lowest rate that is not"),
        "rates": [result.to_json() for result in results],
        "highest_rate_meeting_slo": capacity,
    }
    _print(results, values.slo_p99_ms, values.max_error_rate, capacity)
    if values.json:
        jsonio.write(values.json, report)
    if values.plot:
        plot(results, values.plot, values.slo_p99_ms, capacity,
             f"{target.model} at {target.url}, {values.encoding}; {report['cpu']}")
    return report


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(result: RateResult, slo_p99_ms: Optional[float], max_error_rate: float) -> str:
    latency = result.latency_ms or {}
    errors = ",".join(f"{name}:{n}" for name, n in result.errors.items()) or "0"
    exits = ("/".join(f"{100 * share:.0f}" for share in result.exits.values())
             if result.exits else "-")
    verdict = ("" if slo_p99_ms is None else
               " meets" if result.meets(slo_p99_ms, max_error_rate) else " FAILS")
    behind = " (generator behind)" if result.lag_ms["p99"] > _BEHIND_MS else ""
    waited = " (all connections busy)" if result.waited_for_connections else ""
    accuracy = "-" if result.accuracy is None else f"{result.accuracy:.3f}"
    return (f"{result.rate:>8g} {result.offered_rate:>8.1f} {result.achieved_rate:>8.1f} "
            f"{_ms(latency.get('p50')):>8} {_ms(latency.get('p90')):>8} "
            f"{_ms(latency.get('p99')):>8} {_ms(latency.get('p99.9')):>8} {errors:>10} "
            f"{accuracy:>6} {exits:>12} {result.lag_ms['p99']:>6.2f} "
            f"{result.generator_cpu_ms_per_request:>6.3f}{verdict}{behind}{waited}")


def _print(results: Sequence[RateResult], slo_p99_ms: Optional[float], max_error_rate: float,
           capacity: Optional[float]) -> None:
    print(f"\n{'rate/s':>8} {'offered':>8} {'achieved':>8} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'p99.9 ms':>8} {'errors':>10} {'acc':>6} {'exits %':>12} "
          f"{'lag99':>6} {'cpu ms':>6}")
    for result in results:
        print(_row(result, slo_p99_ms, max_error_rate))
    behind = [f"{r.rate:g}/s ({r.lag_ms['p99']:.1f} ms p99, {r.lag_ms['max']:.0f} ms max)"
              for r in results if r.lag_ms["p99"] > _BEHIND_MS]
    if behind:
        print(f"the generator fell behind its schedule at {', '.join(behind)}: the delay is "
              "inside those latencies (they are measured from due time); give it a core of "
              "its own, or a quieter host, to tell its delay from the server's")
    if slo_p99_ms is not None:
        print(f"highest rate meeting p99 <= {slo_p99_ms:g} ms with at most "
              f"{100 * max_error_rate:g}% errors: "
              f"{'none' if capacity is None else f'{capacity:g} requests/s'}")


def plot(results: Sequence[RateResult], path: str, slo_p99_ms: Optional[float],
         capacity: Optional[float], title: str) -> str:
    """p50 and p99 latency against offered rate (PNG), with the objective's line."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    measured = sorted((r for r in results if r.latency_ms), key=lambda r: r.rate)
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for name, style in (("p50", "o-"), ("p99", "s-")):
        axes.plot([r.offered_rate for r in measured], [r.latency_ms[name] for r in measured],
                  style, label=name)
    if slo_p99_ms is not None:
        axes.axhline(slo_p99_ms, color="red", linestyle="--", label=f"p99 objective "
                     f"{slo_p99_ms:g} ms")
    if capacity is not None:
        axes.axvline(capacity, color="grey", linestyle=":", label=f"highest rate meeting "
                     f"it: {capacity:g}/s")
    axes.set_xlabel("offered rate (requests/s, Poisson)")
    axes.set_ylabel("latency from due time (ms)")
    axes.set_yscale("log")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
