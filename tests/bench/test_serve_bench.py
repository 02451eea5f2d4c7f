"""The load generator (ranet.bench.serve) against stub servers on 127.0.0.1 whose answers and
delays each test controls: the schedule, latency from due time, errors, the arithmetic, the
objective's search, the JSON it writes. Every run is bounded (rates x seconds)."""

import asyncio
import base64
import json
import socket
import threading
import time
from typing import Callable

import numpy as np
import pytest
from aiohttp import web

from helpers import python, tail
from ranet import cli
from ranet.bench import serve
from ranet.errors import UsageError

# A stub's answer to a body: (HTTP status, body) or (HTTP status, body, seconds to wait
# first, other requests going on meanwhile); a respond() that sleeps blocks its whole server.
Respond = Callable[[bytes], tuple]


class StubServer:
    """An aiohttp server in a thread (and event loop) of its own, so that a stall blocks the
    server and not the generator; ``respond(body)`` answers every ``:predict``."""

    def __init__(self, respond: Respond = None, app: web.Application = None):
        self.respond, self._app = respond, app
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _predict(self, request):
        body = await request.read()
        self.requests += 1
        status, answer, *wait = self.respond(body)
        if wait:
            await asyncio.sleep(wait[0])
        if status == 0:  # Drop the connection: a connection error for the client.
            request.transport.abort()
            return web.Response(status=500)
        return web.Response(status=status, body=answer, content_type="application/json")

    async def _status(self, request):
        return web.json_response({"model_version_status": [{"version": "1",
                                                            "state": "AVAILABLE"}]})

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = self._app
        if app is None:
            app = web.Application()
            app.router.add_get("/v1/models/{model}", self._status)
            app.router.add_post("/v1/models/{model}:predict", self._predict)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> "StubServer":
        self._thread.start()
        assert self._ready.wait(10), "the stub server did not start"
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _answer(label: int, exit_number: int = 1) -> bytes:
    return json.dumps({"predictions": [{"classes": label, "exits": exit_number}]}).encode()


def _fixed(status=200, answer=serve.STUB_ANSWER, delay_s=0.0) -> Respond:
    def respond(body):
        if delay_s:
            time.sleep(delay_s)
        return status, answer
    return respond


def test_the_images_are_the_test_split_ranet_eval_reports_on(real_cifar10):
    from ranet import config, data

    images, labels, where = serve.load_test_images("cifar10", str(real_cifar10), 10000, 0, 0)
    expected = data.load_splits(config.DataConfig(data_dir=str(real_cifar10), test_size=10000))
    np.testing.assert_array_equal(images, expected.test.images)
    np.testing.assert_array_equal(labels, expected.test.labels)
    assert images.dtype == np.uint8 and "10000 images" in where
    sample, sample_labels, _ = serve.load_test_images("cifar10", str(real_cifar10), 10000, 500,
                                                      0)
    assert len(sample) == 500 and np.all(np.bincount(sample_labels) == 50)  # class-balanced


def _tiny_workload(num_images=8, labels=None) -> serve.Workload:
    """2x2 images (the stubs need not parse 32x32 ones); pixel (0, 0) carries instructions."""
    images = np.zeros((num_images, 2, 2, 3), np.uint8)
    labels = np.zeros(num_images, np.int64) if labels is None else np.asarray(labels)
    return serve.make_workload(images, labels, "json")


def _run(url, workload, rates, search=None, slo=None, before_rate=lambda rate: None,
         **settings):
    settings = serve.LoadSettings(**{"duration": 1.0, "warmup": 0.0, "connections": 64,
                                     "timeout": 5.0, "pause": 0.0, **settings})
    return asyncio.run(serve.measure(serve.Target(url, "stub"), workload, rates, settings,
                                     search, slo, 0.0, progress=lambda message: None,
                                     before_rate=before_rate))


def _outcomes_of_one_run(url, workload, rate, clock=time.monotonic, during=None, **settings):
    """``run_rate``'s raw outcomes; ``during(loop)`` runs once the run is under way."""
    settings = serve.LoadSettings(**{"duration": 1.0, "warmup": 0.0, "connections": 64,
                                     "timeout": 5.0, **settings})

    async def go():
        async with serve._session(settings) as session:
            if during:
                during(asyncio.get_running_loop())
            return await serve.run_rate(session, serve.Target(url, "stub"), workload, rate,
                                        settings, seed=0, clock=clock)
    return asyncio.run(go())


# --------------------------------------------------------------------------------------------
# Pure parts.

def test_poisson_schedule_has_the_rate_and_exponential_gaps_and_is_seeded():
    due = serve.poisson_schedule(200.0, 50.0, seed=3)
    gaps = np.diff(due)
    assert np.all(gaps > 0) and due[0] >= 0 and due[-1] < 50.0
    assert len(due) == pytest.approx(200 * 50, rel=0.05)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean (a constant rate's would be 0).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(due, serve.poisson_schedule(200.0, 50.0, seed=3))
    assert not np.array_equal(due[:100], serve.poisson_schedule(200.0, 50.0, seed=4)[:100])
    with pytest.raises(UsageError, match="above 0"):
        serve.poisson_schedule(0.0, 1.0, seed=0)


def test_bodies_are_tf_serving_rows_in_both_encodings():
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    as_lists = json.loads(serve.encode_body(image, "json"))
    assert as_lists == {"instances": [image.tolist()]}
    as_b64 = json.loads(serve.encode_body(image, "b64", signature_name="serving_default"))
    assert as_b64["signature_name"] == "serving_default"
    assert base64.b64decode(as_b64["instances"][0]["b64"]) == image.tobytes()
    with pytest.raises(UsageError, match="--encoding"):
        serve.encode_body(image, "png")


@pytest.mark.parametrize("answer, expected", [
    ({"predictions": [{"classes": 3, "exits": 2}]}, (3, 2)),
    ({"predictions": [{"probabilities": [0.1, 0.7, 0.2], "exits": 1}]}, (1, 1)),
    ({"predictions": [[0.1, 0.2, 0.9]]}, (2, None)),
    ({"predictions": [4]}, (4, None)),
    ({"outputs": {"classes": [5], "exits": [3]}}, (5, 3)),
    ({"error": "Model not found"}, (None, None)),
    ({"predictions": []}, (None, None)),
])
def test_answers_name_a_class_and_maybe_an_exit(answer, expected):
    assert serve.parse_answer(json.dumps(answer).encode()) == expected
    assert serve.parse_answer(b"not json") == (None, None)


def test_summary_arithmetic_on_known_outcomes():
    # Ten requests, two of them due in the warm-up (t < 1), eight counted.
    due = np.array([0.2, 0.6, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4])
    latency = np.array([9, 9, 10, 20, 30, 40, 50, 60, 70, 80]) / 1e3
    outcomes = serve.Outcomes.empty(due, image=np.arange(10) % 4)
    outcomes.sent = due + 0.001
    outcomes.done = due + latency
    outcomes.status[:] = [200, 200, 200, 200, 200, 200, 503, serve.CONNECTION_ERROR,
                          serve.TIMEOUT, 200]
    labels = np.array([0, 1, 2, 3])  # image i has label i
    answers = {0: _answer(0), 1: _answer(1), 2: _answer(2, 1), 3: _answer(3, 2),
               4: _answer(1, 2), 5: _answer(1, 3), 9: b"{}"}  # 4: right, 5: wrong, 9: bad
    for i, answer in answers.items():
        outcomes.answers[i] = answer
    outcomes.max_in_flight, outcomes.cpu_seconds = 3, 0.02
    result = serve.summarize(outcomes, labels, rate=4.0, warmup=1.0, duration=2.0,
                             connections=8)
    assert (result.requests, result.answered) == (8, 4)
    assert result.errors == {"503": 1, "bad_answer": 1, "connection": 1, "timeout": 1}
    assert result.error_rate == 4 / 8
    assert result.offered_rate == 8 / 2.0
    # Answers (200) that arrived in [1, 3): those of requests 2..5 and 9 (bad or not).
    assert result.achieved_rate == 5 / 2.0
    # Answered latencies 10, 20, 30, 40 ms: observed values, not interpolated.
    assert result.latency_ms["p50"] == pytest.approx(20)
    assert result.latency_ms["p90"] == pytest.approx(40)
    assert result.latency_ms["p99"] == result.latency_ms["max"] == pytest.approx(40)
    assert result.latency_ms["mean"] == pytest.approx(25)
    assert result.accuracy == 3 / 4  # requests 2, 3, 4 right, 5 wrong
    assert result.exits == {"1": 0.25, "2": 0.5, "3": 0.25}
    assert result.lag_ms["max"] == pytest.approx(1.0)
    assert result.generator_cpu_ms_per_request == pytest.approx(2.0)  # 20 ms over 10 sent
    assert not result.waited_for_connections
    assert result.meets(slo_p99_ms=40.01, max_error_rate=0.5)
    assert not result.meets(slo_p99_ms=39, max_error_rate=0.5)
    assert not result.meets(slo_p99_ms=40.01, max_error_rate=0.4)


def _result(rate, p99, error_rate=0.0):
    return serve.RateResult(rate=rate, offered_rate=rate, achieved_rate=rate, requests=100,
                            answered=100, errors={}, error_rate=error_rate,
                            latency_ms={"p50": p99 / 2, "p90": p99, "p99": p99,
                                        "p99.9": p99, "mean": p99 / 2, "max": p99},
                            accuracy=None, exits=None, lag_ms={"p50": 0, "p99": 0, "max": 0},
                            max_in_flight=1, connections=8, generator_cpu_ms_per_request=0.1)


def test_rate_search_climbs_then_bisects():
    search = serve.RateSearch(start=20, factor=2, refine=2, max_rate=1000)
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, met=rate <= 90)
    assert tried == [20, 40, 80, 160, 120, 100]
    # The ceiling stops the climb; a run that never fails ends there.
    search = serve.RateSearch(start=100, factor=3, refine=2, max_rate=500)
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, met=True)
    assert tried == [100, 300, 500]
    with pytest.raises(UsageError, match="sweep"):
        serve.RateSearch(start=0, factor=2, refine=1, max_rate=10)


def test_the_objective_picks_the_highest_pass_below_the_lowest_failure():
    results = [_result(50, 5), _result(100, 9), _result(200, 30), _result(400, 8),
               _result(150, 4, error_rate=0.01)]
    # 400 met it by luck above 200's failure; 150 failed on errors; so 100.
    assert serve.highest_rate_meeting(results, slo_p99_ms=10, max_error_rate=0.001) == 100
    assert serve.highest_rate_meeting(results, slo_p99_ms=10, max_error_rate=0.05) == 150
    assert serve.highest_rate_meeting(results, slo_p99_ms=4, max_error_rate=0.05) is None


# --------------------------------------------------------------------------------------------
# Against stub servers.

def test_a_server_stall_shows_in_the_tail_of_requests_due_during_it():
    stall = {}

    def respond(body):
        if not stall and time.monotonic() - started >= 0.3:  # Once, 0.3 s in: 200 ms.
            stall["start"] = time.monotonic()
            time.sleep(0.2)
            stall["end"] = time.monotonic()
        return 200, serve.STUB_ANSWER

    with StubServer(respond) as server:
        started = time.monotonic()
        outcomes = _outcomes_of_one_run(server.url, _tiny_workload(), 200.0)
    start, end = stall["start"] - outcomes.start, stall["end"] - outcomes.start
    during = (outcomes.due >= start) & (outcomes.due < end)
    assert during.sum() >= 15  # ~40 requests are due in 200 ms at 200/s
    # Each of them waited for the stall's end, counted from when it was due.
    waited = outcomes.done[during] - outcomes.due[during]
    assert np.all(waited >= end - outcomes.due[during] - 0.002)
    result = serve.summarize(outcomes, np.zeros(8), 200.0, 0.0, 1.0, 64)
    assert result.errors == {} and result.answered == len(outcomes.due)
    assert result.latency_ms["p99"] >= 150
    # The tail is the server's stall, not the generator's lateness.
    assert result.lag_ms["p99"] < result.latency_ms["p99"] / 2


def test_a_late_generator_cannot_hide_the_wait_either():
    """The generator itself stalls 200 ms: requests due then go out late, and their latency
    still counts from when they were due (coordinated omission)."""
    with StubServer(_fixed()) as server:
        outcomes = _outcomes_of_one_run(
            server.url, _tiny_workload(), 200.0,
            during=lambda loop: loop.call_later(0.3, time.sleep, 0.2))
    result = serve.summarize(outcomes, np.zeros(8), 200.0, 0.0, 1.0, 64)
    assert result.lag_ms["max"] >= 150
    late = outcomes.sent - outcomes.due > 0.1
    assert late.sum() >= 8  # ~20 are due in its first 100 ms
    # What a closed-loop tool would report (send to answer) stays small for them ...
    assert np.median(outcomes.done[late] - outcomes.sent[late]) < 0.1
    # ... the latency from due time does not.
    assert np.all(outcomes.done[late] - outcomes.due[late] >= 0.1)
    assert result.latency_ms["p99"] >= 150


def test_errors_are_counted_by_code_and_answers_scored():
    """Pixel (0, 0) of each image says what the stub does: channel 0 the outcome (0: answer,
    1: 503, 2: 400, 3: drop the connection), channel 1 the class, channel 2 the exit."""
    kinds = [0, 0, 0, 0, 1, 2, 3, 0]
    classes = [1, 2, 3, 4, 0, 0, 0, 5]
    exits = [1, 1, 2, 3, 1, 1, 1, 2]
    labels = [1, 2, 0, 4, 0, 0, 0, 0]  # images 0, 1, 3 answered right; 2, 7 wrong
    images = np.zeros((8, 2, 2, 3), np.uint8)
    images[:, 0, 0] = np.stack([kinds, classes, exits], axis=1)
    workload = serve.make_workload(images, np.array(labels), "json")

    def respond(body):
        kind, label, exit_number = json.loads(body)["instances"][0][0][0]
        if kind == 0:
            return 200, _answer(label, exit_number)
        return {1: 503, 2: 400, 3: 0}[kind], b'{"error": "no"}'

    with StubServer(respond) as server:
        outcomes = _outcomes_of_one_run(server.url, workload, 100.0)
    result = serve.summarize(outcomes, workload.labels, 100.0, 0.0, 1.0, 64)
    sent_kinds = np.array(kinds)[outcomes.image]
    assert result.requests == len(outcomes.due)
    assert result.errors == {"503": int(np.sum(sent_kinds == 1)),
                             "400": int(np.sum(sent_kinds == 2)),
                             "connection": int(np.sum(sent_kinds == 3))}
    answered = outcomes.image[sent_kinds == 0]
    assert result.answered == len(answered)
    assert result.accuracy == pytest.approx(np.isin(answered, [0, 1, 3]).mean())
    exit_of = np.array(exits)[answered]
    assert result.exits == {str(e): pytest.approx(np.mean(exit_of == e)) for e in (1, 2, 3)}


def test_the_sweep_finds_the_highest_rate_whose_p99_meets_the_objective():
    """A stub that answers in 2 ms up to 80 requests/s and in 500 ms beyond: with a 250 ms
    objective (wide: the host is shared), the sweep offers 20, 40, 80, 160, then bisects
    120 and 100, and reports 80."""
    delay = {"s": 0.0}

    def respond(body):
        return 200, serve.STUB_ANSWER, delay["s"]

    def before_rate(rate):
        delay["s"] = 0.002 if rate <= 80 else 0.500

    search = serve.RateSearch(start=20, factor=2, refine=2, max_rate=1000)
    with StubServer(respond) as server:
        results = _run(server.url, _tiny_workload(), [], search=search, slo=250.0,
                       before_rate=before_rate, duration=0.4, warmup=0.1, connections=128)
    p99s = [(r.rate, r.latency_ms["p99"]) for r in results]
    assert [r.rate for r in results] == [20, 40, 80, 160, 120, 100], p99s
    assert [r.meets(250.0, 0.0) for r in results] == [True] * 3 + [False] * 3, p99s
    assert serve.highest_rate_meeting(results, 250.0, 0.0) == 80


def _call(*args):
    return cli.call(serve.main, serve.define_flags, [str(a) for a in args])


def test_the_binary_writes_its_table_json_and_plot(tmp_path, capsys):
    with StubServer(_fixed()) as server:
        report = _call(f"--url={server.url}", "--model=stub", "--dataset=synthetic",
                       "--images=20", "--rates=40,80", "--duration=0.5", "--warmup=0.2",
                       "--pause=0", "--slo_p99_ms=1000", f"--json={tmp_path / 'r.json'}",
                       f"--plot={tmp_path / 'r.png'}", "--encoding=b64")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert {"date", "cpu", "command", "url", "model", "encoding", "images", "settings",
            "slo_p99_ms", "max_error_rate", "rule", "rates",
            "highest_rate_meeting_slo"} <= set(written)
    assert written["encoding"] == "b64" and written["model"] == "stub"
    assert written["highest_rate_meeting_slo"] == 80
    for rate, entry in zip((40, 80), written["rates"]):
        assert entry["rate"] == rate and entry["requests"] > 0
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean", "max"}
        assert {"offered_rate", "achieved_rate", "errors", "error_rate", "accuracy", "exits",
                "lag_ms", "max_in_flight", "generator_cpu_ms_per_request",
                "waited_for_connections"} <= set(entry)
        assert entry["exits"] == {"1": 1.0}  # the stub always says exit 1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "highest rate meeting p99 <= 1000 ms" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_clear_errors_for_what_the_user_can_fix():
    with pytest.raises(UsageError, match="cannot reach .* Start the server"):
        _call(f"--url=http://127.0.0.1:{_closed_port()}", "--model=m", "--rate=10")
    with pytest.raises(UsageError, match="--model"):
        _call("--rate=10")
    with pytest.raises(UsageError, match="say what to offer"):
        _call("--model=m")
    with pytest.raises(UsageError, match="--slo_p99_ms"):
        _call("--model=m", "--sweep")
    with pytest.raises(UsageError, match="--rates takes"):
        _call("--model=m", "--rates=10,fast")
    with pytest.raises(UsageError, match="--url is the server's REST root"):
        _call("--model=m", "--rate=10", "--url=127.0.0.1:8501")
    # A model the server does not have (TF Serving's status page says 404), before any data
    # is read; then a server whose status page is fine but whose :predict refuses.
    with StubServer(app=serve.stub_app(model="ranet")) as server:
        with pytest.raises(UsageError, match="has no model 'msdnet'.*Fix --model"):
            _call(f"--url={server.url}", "--model=msdnet", "--rate=10")
    with StubServer(_fixed(status=400, answer=b'{"error": "bad input"}')) as server:
        with pytest.raises(UsageError, match="refused a first request.*HTTP 400.*bad input"):
            _call(f"--url={server.url}", "--model=stub", "--rate=10",
                  "--dataset=synthetic", "--images=10")


def test_an_unreachable_server_ends_the_command_with_one_line_and_status_2():
    process = python("-m", "ranet.bench.serve", "--model=m", "--rate=10",
                     f"--url=http://127.0.0.1:{_closed_port()}", timeout=60)
    assert process.returncode == 2, tail(process)
    assert process.stderr.startswith("error: cannot reach http://127.0.0.1:"), tail(process)
    assert "Traceback" not in process.stderr


def test_the_stub_answers_like_tf_serving():
    """The stub the generator measures itself against: status page and one prediction."""
    with StubServer(app=serve.stub_app()) as server:
        results = _run(server.url, _tiny_workload(), [50.0], duration=0.3)
    assert results[0].errors == {} and results[0].answered == results[0].requests > 0
    assert results[0].exits == {"1": 1.0} and results[0].accuracy == 0.0  # class 3, labels 0
