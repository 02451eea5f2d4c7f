"""The server in-process, on aiohttp's test server (127.0.0.1): the runtime's answers with and
without batching, the JSON a TF Serving client gets from our SavedModel, every refusal with
its status, a flood of malformed requests, and a queue that sheds under overload and
recovers."""

import asyncio
import base64
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from aiohttp.test_utils import TestClient, TestServer

from helpers import VGG16, write_model_dir
from ranet import cli, data, serve
from ranet.errors import UsageError
from ranet.inference import adaptive
from ranet.inference.serving import litert, litert_runtime, saved_model
from ranet.inference.serving import server as server_lib
from ranet.inference.serving.exporting import ExportOptions
from ranet.inference.serving.server import Server, ServerOptions

NAME = "tiny"
PREDICT = f"/v1/models/{NAME}:predict"
# A TF-confidence this close to a threshold is a tie float32 noise may break either way.
TIE = 1e-5


def _options(export, **overrides) -> ServerOptions:
    return ServerOptions(**{"model": (f"{NAME}={export.export_dir}",), "host": "127.0.0.1",
                            "port": 0, "workers": 2, **overrides})


def _run(export, body, **overrides):
    """``await body(client, server)`` against a loaded server; closes it after."""
    async def main():
        server = Server(_options(export, **overrides))
        await server.load()
        try:
            async with TestClient(TestServer(server.app, host="127.0.0.1")) as client:
                return await body(client, server)
        finally:
            server.close()
    return asyncio.run(main())


async def _post(client, payload, path=PREDICT):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with client.post(path, data=body) as response:
        return response.status, json.loads(await response.read())


def _b64(image) -> dict:
    return {"b64": base64.b64encode(np.asarray(image, np.uint8).tobytes()).decode()}


def _expected(export, pixels):
    stages = litert_runtime.LiteRTStages(str(export.export_dir), "fp32")
    return litert_runtime.LiteRTPredictor(stages, "default").predict_batch(pixels)


def _assert_rows_equal(rows, expected):
    assert [row["classes"] for row in rows] == expected["classes"].tolist()
    assert [row["exits"] for row in rows] == expected["exits"].tolist()
    # Equal bit for bit where both run the stage files (float32 printed at its shortest is
    # read back exactly); a host where the runtime picks a one-graph route for one of two
    # predictors sums in another order.
    np.testing.assert_allclose(np.array([row["probabilities"] for row in rows], np.float32),
                               expected["probabilities"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_answers_equal_the_runtime_with_and_without_batching(served_export, max_batch_size):
    pixels = served_export.splits.test.images[:48]
    expected = _expected(served_export, pixels)
    assert set(expected["exits"].tolist()) == {1, 2, 3}, "images should leave at every exit"

    async def body(client, server):
        singles = await asyncio.gather(*(_post(client, {"instances": [image.tolist()]})
                                         for image in pixels))
        binary = await asyncio.gather(*(_post(client, {"instances": [_b64(image)]})
                                        for image in pixels))
        named = await _post(client, {"instances": [{"images": image.tolist()}
                                                   for image in pixels]})
        columns = await _post(client, {"inputs": {"images": pixels.tolist()}})
        registry = server.metrics.registry
        batches = {stage: (registry.get_sample_value("ranet_serve_batch_images_count",
                                                     {"model": NAME, "stage": stage}),
                           registry.get_sample_value("ranet_serve_batch_images_sum",
                                                     {"model": NAME, "stage": stage}))
                   for stage in ("1", "2", "3")}
        return singles, binary, named, columns, batches

    # The first stage waits up to 50 ms for a fuller batch, so that concurrent requests
    # surely share one.
    singles, binary, named, columns, batches = _run(
        served_export, body, max_batch_size=max_batch_size, batch_timeout_micros=50_000)
    for answers in (singles, binary):
        assert [status for status, _ in answers] == [200] * len(pixels)
        _assert_rows_equal([answer["predictions"][0] for _, answer in answers], expected)
    assert named[0] == 200
    _assert_rows_equal(named[1]["predictions"], expected)
    assert columns[0] == 200
    outputs = columns[1]["outputs"]
    _assert_rows_equal([{name: outputs[name][i] for name in outputs}
                        for i in range(len(pixels))], expected)
    calls, images = batches["1"]
    if max_batch_size == 1:
        assert calls == images
    else:
        assert images > calls, "requests that arrive together should share the first stage"
        # Survivors reach stage 2 from several first-stage batches: fewer calls than batches.
        assert batches["2"][1] > batches["2"][0]


def _tensorflow_serving_json(outputs, columnar: bool):
    """What TF Serving writes for the SavedModel's output tensors: a list of one object
    per instance (the signature has several outputs), or a dict of lists."""
    if columnar:
        return {"outputs": {name: value.tolist() for name, value in outputs.items()}}
    count = len(outputs["classes"])
    return {"predictions": [{name: value[i].tolist() for name, value in outputs.items()}
                            for i in range(count)]}


def _structure(value):
    """Keys, nesting, lengths and JSON types, without the numbers."""
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_structure(item) for item in value]
    return type(value).__name__


def test_a_tf_serving_client_gets_the_saved_models_json(served_export):
    export, splits = served_export, served_export.splits
    pixels = splits.test.images[:32]
    thresholds = [float(t) for t in export.manifest["precisions"]["fp32"]["thresholds"]
                  ["default"]]
    module = saved_model.build_serving_module(export.model, thresholds, splits.mean, splits.std)
    signature = module.serving_default.get_concrete_function()
    outputs = {name: tensor.numpy() for name, tensor in
               signature(images=tf.constant(pixels, tf.float32)).items()}

    async def body(client, server):
        rows = await _post(client, {"signature_name": "serving_default",
                                    "instances": pixels.tolist()})
        columns = await _post(client, {"inputs": pixels.tolist()})
        async with client.get(f"/v1/models/{NAME}/metadata") as response:
            metadata = await response.json()
        return rows, columns, metadata

    rows, columns, metadata = _run(export, body)
    for (status, served), columnar in ((rows, False), (columns, True)):
        assert status == 200
        expected = _tensorflow_serving_json(outputs, columnar)
        assert _structure(served) == _structure(expected)
    # Same decisions, but where TensorFlow's confidence ties a threshold within float32 noise.
    confidences = adaptive.confidence(adaptive.all_exit_probabilities(
        export.model, data.normalize(pixels, splits.mean, splits.std)))
    ties = np.any(np.abs(confidences[:-1] - np.float32(thresholds[:-1])[:, None]) < TIE,
                  axis=0)
    served_rows = rows[1]["predictions"]
    for i in np.flatnonzero(~ties):
        assert (served_rows[i]["classes"], served_rows[i]["exits"]) == (
            int(outputs["classes"][i]), int(outputs["exits"][i])), i
    assert ties.sum() <= 2
    # The metadata prints serving_default's signature as TF Serving prints the SavedModel's.
    printed = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert metadata["model_spec"] == {"name": NAME, "signature_name": "", "version": "1"}
    specs = {**{spec.name: spec for spec in tf.nest.flatten(signature.structured_input_signature)},
             **signature.structured_outputs}
    for group, names in (("inputs", ["images"]), ("outputs", sorted(outputs))):
        assert sorted(printed[group]) == names
        for name in names:
            info, spec = printed[group][name], specs[name]
            assert info["dtype"] == f"DT_{spec.dtype.name.upper().replace('FLOAT32', 'FLOAT')}"
            assert [int(dim["size"]) for dim in info["tensor_shape"]["dim"]] == [
                -1 if size is None else size for size in spec.shape]
    assert printed["method_name"] == "tensorflow/serving/predict"


def test_status_readiness_and_liveness(served_export):
    async def body(client, server):
        answers = {}
        for path in (f"/v1/models/{NAME}", f"/v1/models/{NAME}/versions/1", "/ready", "/live",
                     f"/v1/models/{NAME}/versions/2", "/v1/models/other", "/nowhere"):
            async with client.get(path) as response:
                answers[path] = (response.status, await response.text())
        return answers

    answers = _run(served_export, body)
    assert answers[f"/v1/models/{NAME}"] == answers[f"/v1/models/{NAME}/versions/1"]
    status, text = answers[f"/v1/models/{NAME}"]
    assert status == 200 and json.loads(text) == {"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]}
    assert answers["/ready"][0] == answers["/live"][0] == 200
    for path in (f"/v1/models/{NAME}/versions/2", "/v1/models/other", "/nowhere"):
        assert answers[path][0] == 404 and "error" in json.loads(answers[path][1])


_UNCHANGED = object()


def _image(value=_UNCHANGED) -> list:
    """A valid image, or one whose first value is ``value``."""
    image = np.full((32, 32, 3), 7).tolist()
    if value is not _UNCHANGED:
        image[0][0][0] = value
    return image


# (what is wrong, body, status, a piece of the error message)
MALFORMED = [
    ("not JSON", b"{\"instances\": [", 400, "not valid JSON"),
    ("NaN", b"{\"instances\": [[[[NaN, 1, 2]]]]}", 400, "not valid JSON"),
    ("infinity", b"{\"instances\": [[[[1e999, 1, 2]]]]}", 400, "not valid JSON"),
    ("not an object", b"[1, 2, 3]", 400, "JSON object"),
    ("neither key", {"signature_name": "serving_default"}, 400, "exactly one of"),
    ("both keys", {"instances": [_image()], "inputs": [_image()]}, 400, "exactly one of"),
    ("unknown key", {"instances": [_image()], "examples": []}, 400, "unknown keys"),
    ("no instances", {"instances": []}, 400, "non-empty"),
    ("instances not a list", {"instances": 3}, 400, "non-empty"),
    ("wrong shape", {"instances": [[[1, 2, 3]]]}, 400, "shape [N, 32, 32, 3]"),
    ("too few channels", {"inputs": [np.zeros((32, 32, 2), int).tolist()]}, 400, "shape"),
    ("one image as inputs", {"inputs": _image()}, 400, "shape [N, 32, 32, 3]"),
    ("ragged", {"instances": [[[1, 2, 3], [1, 2]]]}, 400, "unequal lengths"),
    ("a string", {"instances": [_image("7")]}, 400, "numbers only"),
    ("a bool", {"instances": [_image(True)]}, 400, "numbers only"),
    ("a null", {"instances": [_image(None)]}, 400, "numbers only"),
    ("an object", {"instances": [_image({"x": 1})]}, 400, "numbers only"),
    ("above 255", {"instances": [_image(255.5)]}, 400, "0..255"),
    ("negative", {"inputs": {"images": [_image(-1)]}}, 400, "0..255"),
    ("huge", {"instances": [_image(10 ** 30)]}, 400, "0..255"),
    ("bad base64", {"instances": [{"b64": "%%%"}]}, 400, "invalid base64"),
    ("short base64", {"instances": [{"b64": base64.b64encode(b"12345").decode()}]}, 400,
     "3072 uint8 bytes"),
    ("b64 not a string", {"instances": [{"b64": 5}]}, 400, "nothing else"),
    ("another input", {"instances": [{"pixels": _image()}]}, 400, "one input"),
    ("another signature", {"signature_name": "all_exits", "instances": [_image()]}, 404,
     "not found"),
]


@pytest.mark.parametrize("what, payload, status, message", MALFORMED,
                         ids=[case[0] for case in MALFORMED])
def test_each_malformed_request_gets_its_status(served_export, what, payload, status, message):
    answer = _run(served_export, lambda client, server: _post(client, payload), workers=1)
    assert answer[0] == status
    assert set(answer[1]) == {"error"} and message in answer[1]["error"], answer


def test_unknown_model_version_and_method_and_a_large_body(served_export):
    async def body(client, server):
        image = {"instances": [_image()]}
        answers = [await _post(client, image, "/v1/models/other:predict"),
                   await _post(client, image, f"/v1/models/{NAME}/versions/3:predict"),
                   await _post(client, image, f"/v1/models/{NAME}:classify"),
                   await _post(client, {"instances": [_image()] * 8})]
        async with client.get(PREDICT) as response:
            answers.append((response.status, await response.json()))
        answers.append(await _post(client, image, f"/v1/models/{NAME}/versions/1:predict"))
        return answers

    answers = _run(served_export, body, max_request_bytes=40_000)
    assert [status for status, _ in answers] == [404, 404, 404, 413, 405, 200]
    assert "Servable not found" in answers[0][1]["error"]
    assert "--max_request_bytes" in answers[3][1]["error"]


def test_a_full_queue_sheds_at_once_and_recovers_and_a_late_request_times_out(served_export):
    image = {"instances": [_image()]}

    async def body(client, server):
        scheduler = server.models[NAME].scheduler
        # The first stage holds a lone image up to 0.5 s for a fuller batch: the queue (one
        # image) is full meanwhile.
        first = asyncio.ensure_future(_post(client, image))
        while scheduler.queued < 1:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        started = loop.time()
        shed = await _post(client, image)
        shed_seconds = loop.time() - started
        return await first, shed, shed_seconds, await _post(client, image)

    first, shed, shed_seconds, after = _run(served_export, body, workers=1, max_batch_size=4,
                                            batch_timeout_micros=500_000, max_queue=1)
    assert first[0] == 200 and after[0] == 200
    assert shed[0] == 503 and "queue is full" in shed[1]["error"]
    assert shed_seconds < 0.25, "a full queue answers at once, it does not wait"

    # The same wait with a 20 ms deadline: answered 504 at the deadline, not when the queue
    # moves on 0.5 s later; the worker then skips the image.
    async def late(client, server):
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await _post(client, image)
        seconds = loop.time() - started
        await asyncio.sleep(0.6)
        return answer, seconds, server.models[NAME].scheduler.in_flight

    (status, answer), seconds, in_flight = _run(
        served_export, late, workers=1, max_batch_size=4, batch_timeout_micros=500_000,
        request_timeout_ms=20)
    assert status == 504 and "deadline" in answer["error"]
    assert seconds < 0.25 and in_flight == 0


def test_a_thousand_malformed_requests_leave_it_serving_correct_answers(served_export):
    pixels = served_export.splits.test.images[:16]
    expected = _expected(served_export, pixels)
    flood = list(itertools.islice(itertools.cycle(MALFORMED), 1000))

    async def body(client, server):
        statuses = []
        for start in range(0, len(flood), 100):
            answers = await asyncio.gather(*(_post(client, payload) for _, payload, _, _
                                             in flood[start:start + 100]))
            statuses += [status for status, _ in answers]
        good = await _post(client, {"instances": pixels.tolist()})
        return statuses, good

    statuses, good = _run(served_export, body)
    assert statuses == [status for _, _, status, _ in flood]
    assert good[0] == 200
    _assert_rows_equal(good[1]["predictions"], expected)


def test_every_request_gets_one_answer_and_overload_sheds_then_recovers(served_export):
    pixels = served_export.splits.test.images[:8]
    expected = _expected(served_export, pixels)
    request = json.dumps({"instances": pixels.tolist()}).encode()

    async def body(client, server):
        burst = await asyncio.gather(*(_post(client, request) for _ in range(80)))
        after = [await _post(client, request) for _ in range(5)]
        registry, scheduler = server.metrics.registry, server.models[NAME].scheduler
        counted = {code: registry.get_sample_value("ranet_serve_requests_total",
                                                   {"model": NAME, "code": code})
                   for code in ("200", "503")}
        in_progress = registry.get_sample_value("ranet_serve_requests_in_progress",
                                                {"model": NAME})
        return burst, after, counted, in_progress, scheduler.in_flight

    # 8 images per request, at most 16 waiting, and a first stage that waits up to 50 ms for
    # a batch of 64: slower than the burst arrives, so the queue overflows.
    burst, after, counted, in_progress, in_flight = _run(
        served_export, body, max_queue=16, max_batch_size=64, batch_timeout_micros=50_000)
    statuses = [status for status, _ in burst]
    assert len(burst) == 80 and set(statuses) == {200, 503}, statuses
    for status, answer in burst + after:
        if status == 200:
            _assert_rows_equal(answer["predictions"], expected)
    assert [status for status, _ in after] == [200] * 5
    assert counted == {"200": statuses.count(200) + 5, "503": statuses.count(503)}
    assert in_progress == 0 and in_flight == 0


def test_keep_alive_answers_are_not_held_for_a_delayed_ack(served_export):
    """NOTES: http.server's two writes per response met Nagle's algorithm on keep-alive
    connections and answered a 2 ms handler in ~45 ms. aiohttp sets TCP_NODELAY; a tiny
    model's sequential answers on one connection come back far below that."""
    request = json.dumps({"instances": [_b64(served_export.splits.test.images[0])]}).encode()

    async def body(client, server):
        loop, seconds = asyncio.get_running_loop(), []
        for _ in range(40):
            started = loop.time()
            status, _ = await _post(client, request)
            seconds.append(loop.time() - started)
            assert status == 200
        return seconds

    assert np.median(_run(served_export, body, workers=1)[5:]) < 0.02


def test_metrics_are_prometheus_text(served_export):
    pixels = served_export.splits.test.images[:24]

    async def body(client, server):
        await _post(client, {"instances": pixels.tolist()})
        await _post(client, b"nonsense")
        async with client.get("/metrics") as response:
            return response.status, response.headers["Content-Type"], await response.text()

    status, content_type, text = _run(served_export, body)
    assert status == 200 and content_type.startswith("text/plain")
    exits = _expected(served_export, pixels)["exits"]
    for line in (f'ranet_serve_requests_total{{code="200",model="{NAME}"}} 1.0',
                 f'ranet_serve_requests_total{{code="400",model="{NAME}"}} 1.0',
                 f'ranet_serve_request_seconds_count{{model="{NAME}"}} 2.0',
                 f'ranet_serve_queue_images{{model="{NAME}"}} 0.0',
                 *(f'ranet_serve_exits_total{{exit="{k}",model="{NAME}"}} '
                   f'{float(np.sum(exits == k))}' for k in set(exits.tolist()))):
        assert line in text.splitlines(), line


def test_bad_flags_and_exports_are_usage_errors(served_export, tmp_path):
    for args, message in ((["--model=noequals"], "NAME=EXPORT_DIR"),
                          ([f"--model=a={tmp_path}", f"--model=a={tmp_path}"], "twice"),
                          ([], "--model is required")):
        with pytest.raises(UsageError, match=message):
            cli.call(serve.main, serve.define_flags, args)

    async def load(**overrides):
        await Server(_options(served_export, **overrides)).load()

    for overrides, message in (({"precision": "int8"}, "precision must be one of fp32"),
                               ({"thresholds": "nonsense"}, "thresholds must be one of"),
                               ({"model": (f"x={tmp_path}",)}, "not a LiteRT export")):
        with pytest.raises(UsageError, match=message):
            asyncio.run(load(**overrides))


def test_max_batch_size_0_picks_by_the_number_of_stages():
    options = ServerOptions(model=("a=/exports/a",))
    assert (options.batch_size(1), options.batch_size(3)) == (server_lib.ONE_STAGE_BATCH, 1)
    assert ServerOptions(model=("a=/exports/a",), max_batch_size=4).batch_size(1) == 4


def _concurrent_answers(export, pixels, **overrides):
    """Each image in a request of its own, all at once; (answers, first-stage calls)."""
    async def body(client, server):
        answers = await asyncio.gather(*(_post(client, {"instances": [_b64(image)]})
                                         for image in pixels))
        calls = server.metrics.registry.get_sample_value(
            "ranet_serve_batch_images_count", {"model": NAME, "stage": "1"})
        return answers, calls

    return _run(export, body, batch_timeout_micros=50_000, **overrides)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, served_export):
    root = tmp_path_factory.mktemp("served_int8")
    litert.export(ExportOptions(
        model_dir=str(served_export.export_dir.parent / "run"), export_dir=str(root / "export"),
        format="litert", litert_precision=("int8",), representative_images=64))
    return SimpleNamespace(export_dir=root / "export", splits=served_export.splits)


@pytest.mark.slow  # an int8 conversion
@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_int8_answers_equal_the_runtime_with_and_without_batching(int8_export, max_batch_size):
    pixels = int8_export.splits.test.images[:40]
    stages = litert_runtime.LiteRTStages(str(int8_export.export_dir), "int8")
    expected = litert_runtime.LiteRTPredictor(stages, "default").predict_batch(pixels)
    answers, calls = _concurrent_answers(int8_export, pixels, precision="int8",
                                         max_batch_size=max_batch_size)
    assert [status for status, _ in answers] == [200] * len(pixels)
    _assert_rows_equal([answer["predictions"][0] for _, answer in answers], expected)
    assert (calls < len(pixels)) == (max_batch_size > 1)


@pytest.mark.slow  # VGG16's conversion
def test_a_one_stage_baseline_batches_by_default(tmp_path):
    write_model_dir(tmp_path / "run", VGG16)
    litert.export(ExportOptions(model_dir=str(tmp_path / "run"),
                                export_dir=str(tmp_path / "export"), format="litert",
                                litert_precision=("fp32",)))
    export = SimpleNamespace(export_dir=tmp_path / "export")
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), np.uint8)
    expected = _expected(export, pixels)
    answers, calls = _concurrent_answers(export, pixels)
    assert [status for status, _ in answers] == [200] * len(pixels)
    rows = [answer["predictions"][0] for _, answer in answers]
    assert [row["classes"] for row in rows] == expected["classes"].tolist()
    np.testing.assert_allclose(np.array([row["probabilities"] for row in rows]),
                               expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert calls < len(pixels)
