"""An HTTP server for LiteRT exports that speaks TF Serving's REST API, without TensorFlow.

``python -m ranet.serve --model=ranet=/exports/ranet_litert`` (``ranet.serve``) runs
``serve``. Endpoints (``docs/serving.md`` has the flags, the measurements and examples):

    GET  /v1/models/NAME[/versions/1]             version status (AVAILABLE once loaded)
    GET  /v1/models/NAME[/versions/1]/metadata    serving_default's signature
    POST /v1/models/NAME[/versions/1]:predict     rows or columns, as TF Serving (``rest``)
    GET  /metrics                                 Prometheus text format
    GET  /ready                                   200 once every model loaded; 503 before,
                                                  and while draining (readiness probe)
    GET  /live                                    200 while the process serves (liveness)

Refusals are TF Serving's ``{"error": "..."}``: 400 malformed, 404 unknown model, version or
signature, 413 body over ``max_request_bytes``, 503 queue full or not loaded yet (at once,
never a silent wait), 504 the request's deadline passed before it was answered.

The event loop (aiohttp) parses and answers; each model's ``batching.Scheduler`` runs the
interpreters on worker threads of its own. aiohttp sets TCP_NODELAY on every connection and
sends a response's headers and body in one write, so Nagle's algorithm never holds an answer
back for the client's delayed ACK (the ~40 ms stall ``http.server`` shows on keep-alive).

SIGTERM (or SIGINT): /ready turns 503, the listening socket closes, every request already
accepted is answered, the workers end, and the process exits 0.
"""

import asyncio
import dataclasses
import os
import re
import signal
import socket
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import prometheus_client
from absl import logging
from aiohttp import web

from ranet.config import flag, require
from ranet.errors import UsageError
from ranet.inference.serving import batching, litert_runtime, rest

VERSION = 1
# --max_batch_size=0 batches a one-stage export (VGG16, MobileNetV2) this much: 10-20% less
# CPU per image than one at a time. A staged one (RANet) costs 13-20% more batched: its small
# stages gain little from a batch below 16, early exits leave the later stages smaller ones,
# and the survivors' features are copied between calls (docs/serving.md).
ONE_STAGE_BATCH = 8
THRESHOLD_NAMES = "default, fixed or a budget in million multiply-adds"
# Request latency buckets, seconds: sub-millisecond answers to the default deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
                   r"(?P<rest>/metadata|:[a-zA-Z]+)?$")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What to serve and how (the flags of ``ranet.serve``)."""
    model: tuple = flag((), "A model to serve, NAME=EXPORT_DIR (a folder written by "
                        "python -m ranet.export --format=litert); repeat for several.",
                        kind="strings")
    precision: str = flag("fp32", "Which of the export's files to serve (int8: full-integer, "
                          "faster, a few answers differ).",
                          choices=litert_runtime.PRECISIONS)
    thresholds: str = flag("default", "The operating point, by its name in the manifest: "
                           f"{THRESHOLD_NAMES} (e.g. 20).")
    host: str = flag("0.0.0.0", "Address to listen on.")
    port: int = flag(8501, "Port to listen on (TF Serving's REST port; 0: any free one, "
                     "logged).", lower_bound=0)
    workers: int = flag(0, "Worker threads per model, each with interpreters of its own "
                        "(0: one per core).", lower_bound=0)
    num_threads: int = flag(1, "XNNPACK threads per interpreter.", lower_bound=1)
    max_batch_size: int = flag(
        0, "Most images one stage call runs (TF Serving's name); 1 runs each image through "
        "its stages alone. 0: by the export, what won on a 2-core host (docs/serving.md): "
        f"{ONE_STAGE_BATCH} for a one-stage model (a baseline), 1 for a staged one (RANet, "
        "MSDNet).", lower_bound=0)
    batch_timeout_micros: int = flag(
        0, "How long a stage short of a full batch waits for more images (TF Serving's name): "
        "new ones at the first stage, survivors of later batches at the others. 0: runs what "
        "is there.", lower_bound=0)
    max_queue: int = flag(64, "Most images waiting for their first stage; a request that "
                          "finds the queue full is refused with 503 at once.", lower_bound=1)
    max_request_bytes: int = flag(8 << 20, "Largest request body; a larger one gets 413.",
                                  lower_bound=1)
    request_timeout_ms: int = flag(
        30000, "A request not answered within this many milliseconds of its arrival gets "
        "504, and its images still queued are dropped (TF Serving's rest_api_timeout_in_ms "
        "default).", lower_bound=1)
    drain_seconds: float = flag(30.0, "On SIGTERM, how long to wait for the requests "
                                "already accepted before closing their connections.",
                                lower_bound=0.0)

    def __post_init__(self):
        require(bool(self.model), "--model is required: NAME=EXPORT_DIR of a LiteRT export")
        self.model_dirs()  # every --model is NAME=DIR, each name once

    def model_dirs(self) -> Dict[str, str]:
        dirs = {}
        for entry in self.model:
            name, separator, directory = entry.partition("=")
            if not separator or not name or not directory or "/" in name or ":" in name:
                raise UsageError("--model takes NAME=EXPORT_DIR, NAME without '/' or ':'. "
                                 f"Received: --model={entry}")
            if name in dirs:
                raise UsageError(f"--model names {name!r} twice; give each model its own "
                                 f"name. Received: --model={entry}")
            dirs[name] = directory
        return dirs

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def batching(self, num_stages: int) -> batching.BatchingOptions:
        return batching.BatchingOptions(self.batch_size(num_stages), self.batch_timeout_micros,
                                        self.max_queue)

    def batch_size(self, num_stages: int) -> int:
        """``max_batch_size``, or for 0 what won for an export of ``num_stages``."""
        if self.max_batch_size:
            return self.max_batch_size
        return ONE_STAGE_BATCH if num_stages == 1 else 1


@dataclasses.dataclass
class ServedModel:
    """A loaded model: what the API reports about it and the scheduler that runs it."""
    name: str
    image_shape: Tuple[int, ...]
    num_classes: int
    scheduler: batching.Scheduler


def _runners(export_dir: str, options: ServerOptions) -> Tuple[list, List[float], dict]:
    """One runner per worker, each with interpreters of its own; the thresholds; the
    manifest."""
    # By the operating point's name, as the runtime takes it: the name also brings where
    # images leave at that point, from which each predictor picks its fastest route.
    def predictor() -> litert_runtime.LiteRTPredictor:
        return litert_runtime.LiteRTPredictor(
            litert_runtime.LiteRTStages(export_dir, options.precision, options.num_threads),
            options.thresholds)

    reference = predictor()
    manifest = reference.stages.manifest
    batch_size = options.batch_size(len(manifest["stages"]))
    if batch_size == 1:
        runners = [batching.ImageRunner(reference)] + [
            batching.ImageRunner(predictor()) for _ in range(options.worker_count() - 1)]
    else:
        sizes = batching.allowed_batch_sizes(batch_size)
        runners = [batching.StageRunner(
            batching.BatchedStages(export_dir, options.precision, sizes, options.num_threads),
            reference.thresholds, reference.confidence_kind)
            for _ in range(options.worker_count())]
    return runners, reference.thresholds, manifest


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers can live
    in one process, as in tests)."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        common = {"registry": self.registry, "namespace": "ranet_serve"}
        self.requests = prometheus_client.Counter(
            "requests", "Predict requests answered, by model and HTTP status.",
            ["model", "code"], **common)
        self.latency = prometheus_client.Histogram(
            "request_seconds", "Predict latency in the server: headers read to answer made.",
            ["model"], buckets=LATENCY_BUCKETS, **common)
        self.in_progress = prometheus_client.Gauge(
            "requests_in_progress", "Predict requests accepted and not yet answered.",
            ["model"], **common)
        self.queued = prometheus_client.Gauge(
            "queue_images", "Images waiting for their first stage.", ["model"], **common)
        self.exits = prometheus_client.Counter(
            "exits", "Images answered, by the exit (1-based) they left at.",
            ["model", "exit"], **common)
        self.batches = prometheus_client.Histogram(
            "batch_images", "Images per stage call.", ["model", "stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64), **common)

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class Server:
    """The aiohttp application over some models, loaded by ``load`` (in worker threads)
    while the server already answers /live and /ready.

    Args:
        options: the flags' values.
        clock: seconds; deadlines are on it (the schedulers' clock too).
    """

    def __init__(self, options: ServerOptions, clock=time.monotonic):
        self.options = options
        self.clock = clock
        self.metrics = Metrics()
        self.models: Dict[str, ServedModel] = {}
        self.loaded = False
        self.draining = False
        self._names = list(options.model_dirs())
        self.app = web.Application(client_max_size=options.max_request_bytes)
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/ready", self._ready)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_route("*", "/v1/models/{path:.*}", self._models)
        self.app.router.add_route("*", "/{path:.*}", self._unknown_path)

    async def load(self) -> None:
        """Loads every model, each in a thread of its own; raises ``UsageError`` for a bad
        export, precision or operating point."""
        loop = asyncio.get_running_loop()
        dirs = self.options.model_dirs()
        loaded = await asyncio.gather(*(loop.run_in_executor(None, _runners, dirs[name],
                                                             self.options)
                                        for name in self._names))
        for name, (runners, thresholds, manifest) in zip(self._names, loaded):
            batches = self.metrics.batches
            batch_options = self.options.batching(len(manifest["stages"]))
            scheduler = batching.Scheduler(
                runners, batch_options, self.clock,
                on_batch=lambda k, n, name=name: batches.labels(name, str(k + 1)).observe(n))
            self.models[name] = ServedModel(
                name, tuple(manifest["input"]["shape"][1:]), manifest["num_classes"], scheduler)
            self.metrics.queued.labels(name).set_function(
                lambda scheduler=scheduler: scheduler.queued)
            logging.info("loaded %s from %s (%s, thresholds %s, %d workers, batch <= %d)", name,
                         dirs[name], self.options.precision, thresholds,
                         self.options.worker_count(), batch_options.max_batch_size)
        self.loaded = True

    def drain(self) -> None:
        """/ready turns 503 and the queued images run without waiting for fuller batches."""
        self.draining = True
        for model in self.models.values():
            model.scheduler.drain()

    def close(self) -> None:
        """Ends every model's workers once the requests they hold are answered."""
        for model in self.models.values():
            model.scheduler.close()

    # Handlers ---------------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="alive\n")

    async def _ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=rest.UNAVAILABLE, text="draining\n")
        if not self.loaded:
            return web.Response(status=rest.UNAVAILABLE, text="loading\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _unknown_path(self, request: web.Request) -> web.Response:
        return _error(rest.NOT_FOUND, f"Malformed request: {request.method} {request.path}. "
                      "This server answers /v1/models/NAME[:predict|/metadata], /metrics, "
                      "/ready and /live.")

    async def _models(self, request: web.Request) -> web.Response:
        try:
            name, rest_of_path = self._route(request)
            if rest_of_path == ":predict":
                return await self._predict(request, name)
            if request.method != "GET":
                raise rest.RestError(405, f"{request.method} is not allowed on "
                                          f"{request.path}; use GET (or POST to :predict).")
            if rest_of_path == "/metadata":
                self._require_loaded(name)
                model = self.models[name]
                return _json(rest.metadata_body(name, VERSION, model.image_shape,
                                                model.num_classes))
            return _json(rest.status_body(VERSION, name in self.models))
        except rest.RestError as error:
            return _error(error.status, error.message)

    def _route(self, request: web.Request) -> Tuple[str, str]:
        match = _PATH.match(request.path)
        if not match:
            raise rest.RestError(rest.NOT_FOUND, f"Malformed request: {request.method} "
                                 f"{request.path}")
        name, version, rest_of_path = match["name"], match["version"], match["rest"] or ""
        if rest_of_path.startswith(":") and rest_of_path != ":predict":
            raise rest.RestError(rest.NOT_FOUND, f"{rest_of_path[1:]} is not served: this "
                                 "server answers :predict only.")
        if name not in self._names:
            raise rest.RestError(rest.NOT_FOUND, f"Servable not found for request: "
                                 f"Latest({name}); serving {', '.join(self._names)}")
        if version is not None and version != str(VERSION):
            raise rest.RestError(rest.NOT_FOUND, f"Servable not found for request: "
                                 f"Specific({name}, {version}); version {VERSION} is served")
        return name, rest_of_path

    def _require_loaded(self, name: str) -> None:
        if name not in self.models:
            raise rest.RestError(rest.UNAVAILABLE, f"{name} is still loading; retry when "
                                 "/ready answers 200.")

    async def _predict(self, request: web.Request, name: str) -> web.Response:
        started = self.clock()
        status, response = await self._answer(request, name, started)
        self.metrics.requests.labels(name, str(status)).inc()
        self.metrics.latency.labels(name).observe(self.clock() - started)
        return response

    async def _answer(self, request: web.Request, name: str,
                      started: float) -> Tuple[int, web.Response]:
        try:
            if request.method != "POST":
                raise rest.RestError(405, f"{request.method} is not allowed on :predict; "
                                          "POST a JSON body.")
            self._require_loaded(name)
            model = self.models[name]
            body = await self._body(request)
            images, columnar = rest.parse_predict(body, model.image_shape)
            answers = await self._run(model, images, started)
        except rest.RestError as error:
            return error.status, _error(error.status, error.message)
        for exit_, count in zip(*np.unique(answers["exits"], return_counts=True)):
            self.metrics.exits.labels(name, str(exit_)).inc(int(count))
        return 200, _json(rest.predict_body(answers, columnar))

    async def _body(self, request: web.Request) -> bytes:
        limit = self.options.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise rest.RestError(rest.TOO_LARGE, f"the body is {request.content_length} bytes, "
                                 f"over the limit of {limit} (--max_request_bytes); send fewer "
                                 "images per request.")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise rest.RestError(rest.TOO_LARGE, f"the body is over the limit of {limit} bytes "
                                 "(--max_request_bytes); send fewer images per request."
                                 ) from None

    async def _run(self, model: ServedModel, images: np.ndarray,
                   started: float) -> Dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def resolve(result) -> None:
            if not future.done():
                future.set_result(result)

        job = batching.Job(images, started, started + self.options.request_timeout_ms / 1e3,
                           lambda result: loop.call_soon_threadsafe(resolve, result),
                           model.num_classes)
        try:
            model.scheduler.submit(job)
        except batching.Overloaded as error:
            raise rest.RestError(rest.UNAVAILABLE, str(error)) from None
        gauge = self.metrics.in_progress.labels(model.name)
        gauge.inc()
        try:
            # Answered at the deadline even while every worker is busy elsewhere: a client
            # waits no longer than --request_timeout_ms.
            result = await asyncio.wait_for(asyncio.shield(future),
                                            max(job.deadline - self.clock(), 0))
        except asyncio.TimeoutError:
            result = (batching.DeadlineExceeded("the request's deadline passed before it was "
                                                "answered") if model.scheduler.cancel(job)
                      else await future)
        finally:
            gauge.dec()
        if isinstance(result, batching.DeadlineExceeded):
            raise rest.RestError(rest.TIMEOUT, f"{result} ({self.options.request_timeout_ms} ms,"
                                 " --request_timeout_ms)")
        if isinstance(result, Exception):
            raise rest.RestError(rest.INTERNAL, f"the model failed: {result!r}")
        return result


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json(rest.error_body(message), status)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket: with port 0 the kernel picks a free port, which the log then names."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror}); pick another "
                         f"--port or --host. Received: --host={host} --port={port}") from None
    return sock


async def serve_until_stopped(options: ServerOptions,
                              stop: Optional[asyncio.Event] = None) -> None:
    """Listens, loads the models, serves until SIGTERM or SIGINT (or ``stop``), then drains:
    stops accepting, answers every request accepted, ends the workers."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(options)
    runner = web.AppRunner(server.app, access_log=None, shutdown_timeout=options.drain_seconds)
    await runner.setup()
    sock = listening_socket(options.host, options.port)
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    logging.info("listening on http://%s:%d", host, port)
    try:
        loading = asyncio.ensure_future(server.load())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopped], return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a bad export ends the server here, with its message
            logging.info("ready: serving %s on port %d", ", ".join(server.models), port)
            await stopped
        else:
            await loading
        logging.info("draining: answering the requests already accepted")
    finally:
        server.drain()
        await runner.cleanup()
        server.close()
    logging.info("stopped")


def serve(options: ServerOptions) -> None:
    asyncio.run(serve_until_stopped(options))
