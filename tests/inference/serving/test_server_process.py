"""``python -m ranet.serve`` as a real process on 127.0.0.1: it serves where TensorFlow cannot
be imported, and SIGTERM under load answers every request already accepted and exits 0."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers import REFUSE_TENSORFLOW, REPO_ROOT, python, tail, wait_for_output
from ranet.inference.serving import litert_runtime

NAME = "tiny"
READY = "ready: serving"
# Installed before anything else in the server's process: importing TensorFlow or Keras
# fails, and at exit the process lists whatever of them it imported anyway.
_WITHOUT_TENSORFLOW = REFUSE_TENSORFLOW + """
import atexit, json, runpy
modules_path = sys.argv.pop(1)
atexit.register(lambda: json.dump(sorted(m for m in sys.modules
                                         if m.split(".")[0] in ("tensorflow", "keras")),
                                  open(modules_path, "w")))
sys.argv[0] = "ranet.serve"
runpy.run_module("ranet.serve", run_name="__main__")
"""


def _start(tmp_path, export_dir, *flags, prelude=None):
    """The server on a free port of 127.0.0.1, once ready: (process, base URL)."""
    log = tmp_path / "server.log"
    command = ([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path / "modules.json")]
               if prelude else [sys.executable, "-m", "ranet.serve"])
    process = subprocess.Popen(
        command + [f"--model={NAME}={export_dir}", "--host=127.0.0.1", "--port=0", *flags],
        cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        wait_for_output(log, READY, process, timeout=60)
    except AssertionError:
        process.kill()
        raise
    port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())[1]
    return process, f"http://127.0.0.1:{port}", log


def _post(url, payload, timeout=30):
    request = urllib.request.Request(f"{url}/v1/models/{NAME}:predict",
                                     data=json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get(url, path):
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _stop(process, timeout=30):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _expected(export_dir, pixels):
    stages = litert_runtime.LiteRTStages(str(export_dir), "fp32")
    return litert_runtime.LiteRTPredictor(stages, "default").predict_batch(pixels)


def test_it_serves_where_tensorflow_cannot_be_imported(served_export, tmp_path):
    pixels = served_export.splits.test.images[:8]
    process, url, log = _start(tmp_path, served_export.export_dir, prelude=True)
    try:
        status, answer = _post(url, {"instances": pixels.tolist()})
        metrics = _get(url, "/metrics")
    finally:
        returncode = _stop(process)
    assert returncode == 0, log.read_text()[-3000:]
    assert status == 200 and metrics[0] == 200
    assert json.loads((tmp_path / "modules.json").read_text()) == []
    expected = _expected(served_export.export_dir, pixels)
    assert [row["classes"] for row in answer["predictions"]] == expected["classes"].tolist()
    assert [row["exits"] for row in answer["predictions"]] == expected["exits"].tolist()


def test_sigterm_answers_every_accepted_request_then_exits_0(served_export, tmp_path):
    pixels = served_export.splits.test.images[:20]
    expected = _expected(served_export.export_dir, pixels)
    # The first stage waits up to 20 s for a batch of 64: the 20 requests stay accepted and
    # unanswered until SIGTERM makes the queue run.
    process, url, log = _start(tmp_path, served_export.export_dir, "--workers=1",
                               "--max_batch_size=64", "--batch_timeout_micros=20000000")
    try:
        with concurrent.futures.ThreadPoolExecutor(len(pixels)) as pool:
            sent = [pool.submit(_post, url, {"instances": [image.tolist()]})
                    for image in pixels]
            in_progress = f'ranet_serve_requests_in_progress{{model="{NAME}"}} 20.0'
            deadline = time.monotonic() + 20
            while in_progress not in _get(url, "/metrics")[1]:
                assert time.monotonic() < deadline, _get(url, "/metrics")[1]
                time.sleep(0.05)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=30) for future in sent]
        drained = time.monotonic() - started
        returncode = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert returncode == 0, log.read_text()[-3000:]
    assert [status for status, _ in answers] == [200] * len(pixels)
    assert [answer["predictions"][0]["classes"] for _, answer in answers] == \
        expected["classes"].tolist()
    assert drained < 10, "the queue runs at once on SIGTERM, not after the batch timeout"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/live", timeout=5)
    assert "draining" in log.read_text() and "stopped" in log.read_text()


def test_a_bad_flag_is_one_line_and_status_2():
    run = python("-m", "ranet.serve", "--model=noequals", timeout=120)
    assert run.returncode == 2, tail(run)
    assert "error: --model takes NAME=EXPORT_DIR" in run.stderr, tail(run)
    assert "Traceback" not in run.stderr
