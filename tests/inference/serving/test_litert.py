"""The LiteRT export: stage files that answer as TensorFlow does, a manifest that round-trips,
int8 on XNNPACK alone, and a runtime that early-exits like AdaptivePredictor without TensorFlow.

The model directory is made without training: the tiny 3-exit RANet with its exit layers
sharpened so that confidences spread (``helpers.write_model_dir``).
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from helpers import REFUSE_TENSORFLOW, SYNTHETIC_DATA, VGG16, write_model_dir
from ranet import data
from ranet.config import DataConfig, ModelConfig
from ranet.data import report_images
from ranet.inference import adaptive, calibration, comparison, points
from ranet.inference.serving import litert, litert_runtime
from ranet.training import model_dir as model_dir_lib
from ranet.inference.serving.exporting import ExportOptions

NUM_EXITS = 3
# fp32 LiteRT against TensorFlow, per exit: XNNPACK folds batch norm into the convolutions and
# sums in another order; measured below 1e-5 on these logits (|logit| up to ~30).
LOGIT_RTOL, LOGIT_ATOL = 1e-4, 1e-4
# Two confidences closer than this are a tie that float32 rounding may break either way.
TIE = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny RANet exported to LiteRT, fp32 and int8, with two budgets."""
    root = tmp_path_factory.mktemp("litert")
    model = write_model_dir(root / "run", logit_scale=6.0)
    manifest = litert.export(ExportOptions(
        model_dir=str(root / "run"), export_dir=str(root / "export"), format="litert",
        budget_mflops=(2, 3), representative_images=64))
    return root / "export", manifest, model


@pytest.fixture(scope="module")
def splits():
    return data.load_splits(SYNTHETIC_DATA)


@pytest.fixture(scope="module")
def stages(exported):
    return {precision: litert_runtime.LiteRTStages(str(exported[0]), precision, num_threads=2)
            for precision in ("fp32", "int8")}


def _tf_logits(model, pixels, splits):
    return np.stack([logits.numpy() for logits in
                     model(data.normalize(pixels, splits.mean, splits.std), training=False)])


def test_files_and_manifest_round_trip(exported, splits):
    export_dir, manifest, model = exported
    assert json.loads((export_dir / litert_runtime.MANIFEST).read_text()) == manifest
    assert manifest["format"] == litert_runtime.FORMAT
    assert (manifest["num_exits"], manifest["num_classes"]) == (NUM_EXITS, 10)
    assert manifest["input"]["shape"] == [1, 32, 32, 3]
    np.testing.assert_array_equal(manifest["normalization"]["mean"], splits.mean)
    assert manifest["stages"][0]["inputs"] == ["images"]
    assert all("logits" in stage["outputs"] for stage in manifest["stages"])
    assert manifest["stages"][-1]["outputs"] == ["logits"]
    assert manifest["operating_point"]["rule"] == "budget"
    assert manifest["operating_point"]["num_images"] == SYNTHETIC_DATA.validation_size
    for precision in ("fp32", "int8"):
        entry = manifest["precisions"][precision]
        assert entry["files"] == [f"{precision}/stage{k}.tflite" for k in (1, 2, 3)]
        assert all((export_dir / path).is_file() for path in entry["files"])
        thresholds = entry["thresholds"]
        assert set(thresholds) == {"default", "budgets"} and set(thresholds["budgets"]) == {"2", "3"}
        assert thresholds["default"][-1] == "-inf"
        # Each stage's fastest XNNPACK threads where it was exported, for clients to read.
        host = entry["threads_on_export_host"]
        assert len(host["stages"]) == NUM_EXITS and host["cores"] == os.cpu_count()
        predictor = litert_runtime.LiteRTPredictor(
            litert_runtime.LiteRTStages(str(export_dir), precision), "3")
        assert predictor.thresholds == [float(t) for t in thresholds["budgets"]["3"]]


def test_every_op_is_builtin_and_every_stage_runs_wholly_on_xnnpack(stages):
    for precision, staged in stages.items():
        for k, interpreter in enumerate(staged.interpreters, start=1):
            ops = [op["op_name"] for op in interpreter._get_ops_details()]
            assert not [op for op in ops if "FLEX" in op.upper() or op == "CUSTOM"], ops
            # After delegation one DELEGATE node stands for the ops XNNPACK took; a second
            # would mean an op it refused split the graph (int8 SLICE and AVERAGE_POOL_2D did).
            assert ops.count("DELEGATE") == 1, (precision, k, ops)
            assert "SLICE" not in ops and "AVERAGE_POOL_2D" not in ops, (precision, k, ops)


def test_fp32_logits_of_every_exit_match_tensorflow(exported, stages, splits):
    model = exported[2]
    pixels = splits.test.images[:24]
    expected = _tf_logits(model, pixels, splits)
    got = stages["fp32"].all_exit_logits(pixels)
    np.testing.assert_allclose(got, expected, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)


def test_int8_agrees_with_fp32_on_most_images(stages, splits):
    pixels = splits.test.images[:64]
    fp32 = stages["fp32"].all_exit_logits(pixels).argmax(-1)
    int8 = stages["int8"].all_exit_logits(pixels).argmax(-1)
    agreement = (fp32 == int8).mean(axis=1)
    assert np.all(agreement >= 0.9), agreement


def test_every_exit_in_one_graph_answers_as_the_stage_files(exported, stages, splits):
    export_dir, manifest, _ = exported
    pixels = splits.test.images[:40]   # one batch of 32 and a partial one
    for precision, staged in stages.items():
        assert manifest["precisions"][precision]["all_exits"] == {
            "1": f"{precision}/all_exits.tflite", "32": f"{precision}/all_exits_batch32.tflite"}
        for batch in (1, 32):
            ops = [op["op_name"] for op in staged.all_exits(batch).interpreter._get_ops_details()]
            assert ops.count("DELEGATE") == 1, (precision, batch, ops)
        chained = np.stack([np.stack([staged.run_stage(k, image) for k in range(NUM_EXITS)])
                            for image in pixels], axis=1)
        one_by_one = np.stack([staged.every_exit(image) for image in pixels], axis=1)
        batched = staged.all_exit_logits(pixels)
        assert chained.shape == one_by_one.shape == batched.shape == (NUM_EXITS, 40, 10)
        # Both cut from one graph: the same operators on the same tensors, int8 included.
        np.testing.assert_array_equal(one_by_one, chained)
        if precision == "fp32":
            np.testing.assert_allclose(batched, chained, rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
        else:
            # The batch-32 file is quantised on its own: nearly every image gets the same
            # class at every exit.
            agreement = (batched.argmax(-1) == chained.argmax(-1)).mean(axis=1)
            assert np.all(agreement >= 0.9), (precision, agreement)


def test_int8_features_cross_stages_as_int8_at_their_producers_scale(exported, stages):
    export_dir, manifest, _ = exported
    int8 = stages["int8"]
    assert manifest["precisions"]["int8"]["feature_dtype"] == "int8"
    assert manifest["precisions"]["fp32"]["feature_dtype"] == "float32"
    for k in range(1, NUM_EXITS):
        for destination, source in int8._copies[k]:
            assert destination().dtype == source().dtype == np.int8
    signatures = [interpreter.get_signature_runner() for interpreter in int8.interpreters]
    read = 0
    for k in range(1, NUM_EXITS):
        for name, entry in signatures[k].get_input_details().items():
            producer = max(j for j in range(k) if name in int8._outputs[j])
            made = signatures[producer].get_output_details()[name]
            assert entry["dtype"] == made["dtype"] == np.int8, (k, name)
            assert entry["quantization"] == made["quantization"], (k, name)
            read += 1
    assert read >= NUM_EXITS - 1


def _routes_answer(predictor, pixels):
    answers = [predictor.predict(image) for image in pixels]
    return ([a[0] for a in answers], [a[1] for a in answers], np.stack([a[2] for a in answers]))


def _every_route_answers_as_stage_by_stage(stages, pixels, thresholds):
    reference = _routes_answer(litert_runtime.LiteRTPredictor(
        stages, thresholds, route=stages.num_exits), pixels)
    assert len(set(reference[1])) > 1, "the thresholds must spread the images over the exits"
    for route in stages.routes:
        answers = _routes_answer(litert_runtime.LiteRTPredictor(stages, thresholds, route=route),
                                 pixels)
        assert answers[:2] == reference[:2], route
        np.testing.assert_array_equal(answers[2], reference[2])


def test_every_route_gives_the_stage_by_stage_answers(exported, stages, splits):
    pixels = splits.test.images[:48]
    for precision, staged in stages.items():
        assert staged.routes == list(range(1, NUM_EXITS + 1))
        probabilities = litert_runtime.softmax(staged.all_exit_logits(pixels))
        confidences = litert_runtime.confidence(probabilities, "max_softmax")
        for q in (0.5, 1.5):
            thresholds = calibration.thresholds_for_distribution(
                confidences, calibration.exit_distribution(q, NUM_EXITS))
            _every_route_answers_as_stage_by_stage(staged, pixels, thresholds)


def test_every_route_gives_the_stage_by_stage_answers_on_real_images(exported, stages,
                                                                     real_cifar10):
    real = data.load_splits(DataConfig(dataset="cifar10", data_dir=str(real_cifar10),
                                       validation_size=0))
    pixels = real.train.images[:100]
    for precision, staged in stages.items():
        thresholds = exported[1]["precisions"][precision]["thresholds"]["default"]
        _every_route_answers_as_stage_by_stage(staged, pixels, thresholds)


def test_the_export_records_each_points_fastest_route_with_the_timings_that_chose_it(exported):
    manifest = exported[1]
    for precision in ("fp32", "int8"):
        routes = manifest["precisions"][precision]["routes"]
        timings = litert_runtime.RouteTimings.from_json(routes["timings"])
        assert timings.host == litert_runtime.this_host(litert_runtime.AUTO_THREADS)
        assert len(timings.stage_ms) == NUM_EXITS and set(timings.from_stage_ms) == {1, 2}
        chosen = [routes["points"]["default"]] + list(routes["points"]["budgets"].values())
        assert len(chosen) == 3
        for point in chosen:
            assert sum(point["exit_fractions"]) == pytest.approx(1.0)
            expected = {int(s): ms for s, ms in point["expected_ms"].items()}
            assert point["switch_stage"] == min(expected, key=expected.get)
            for first, ms in expected.items():
                assert ms == pytest.approx(litert_runtime.expected_route_ms(
                    point["exit_fractions"], timings, first))


def test_expected_route_time_is_the_hand_computed_sum():
    timings = litert_runtime.RouteTimings({}, stage_ms=[1.0, 2.0, 3.0],
                                          from_stage_ms={1: 4.5, 2: 4.0})
    early = [0.5, 0.3, 0.2]   # reach: 1, 0.5, 0.2
    assert litert_runtime.expected_route_ms(early, timings, 3) == pytest.approx(1 + 1 + 0.6)
    assert litert_runtime.expected_route_ms(early, timings, 2) == pytest.approx(1 + 0.5 * 4)
    assert litert_runtime.expected_route_ms(early, timings, 1) == pytest.approx(4.5)
    assert litert_runtime.choose_route(early, timings, [1, 2, 3])[0] == 3
    late = [0.0, 0.0, 1.0]    # everything to the end: 6, 5 or 4.5
    assert litert_runtime.choose_route(late, timings, [1, 2, 3]) == (1, {
        1: pytest.approx(4.5), 2: pytest.approx(5.0), 3: pytest.approx(6.0)})


def test_a_route_is_rechosen_when_this_hosts_timings_say_so(exported, monkeypatch):
    export_dir, manifest, _ = exported
    fractions = manifest["precisions"]["int8"]["routes"]["points"]["default"]["exit_fractions"]
    favour = {1: litert_runtime.RouteTimings({}, [5.0, 5.0, 5.0], {1: 0.1, 2: 9.0}),
              3: litert_runtime.RouteTimings({}, [0.1, 0.1, 0.1], {1: 9.0, 2: 9.0})}

    def recorded_as(route, host):
        timings = dataclasses.replace(favour[route], host=host)
        entry = copy.deepcopy(manifest)
        entry["precisions"]["int8"]["routes"]["timings"] = timings.to_json()
        return entry

    here = litert_runtime.this_host(1)
    elsewhere = {**here, "cpu": "another CPU"}
    for recorded, host, timed_here, chosen in ((1, here, None, 1), (3, elsewhere, 1, 1),
                                               (1, elsewhere, 3, 3)):
        monkeypatch.setattr(litert_runtime, "read_manifest",
                            lambda _, m=recorded_as(recorded, host): m)
        calls = []
        monkeypatch.setattr(litert_runtime, "time_routes",
                            lambda stages, r=timed_here: calls.append(r) or dataclasses.replace(
                                favour[r], host=here))
        staged = litert_runtime.LiteRTStages(str(export_dir), "int8", num_threads=1)
        predictor = litert_runtime.LiteRTPredictor(staged, "default")
        assert predictor.route == chosen, (recorded, host)
        assert calls == ([] if timed_here is None else [timed_here])
        assert predictor.expected_ms == pytest.approx(litert_runtime.choose_route(
            fractions, staged.route_timings(), staged.routes)[1])


def test_auto_threads_keep_the_fastest_count_for_each_file(exported, monkeypatch):
    path = str(exported[0] / "int8" / "stage1.tflite")
    for seconds, fastest in (((2.0, 1.0), 2), ((1.0, 2.0), 1)):
        calls = iter(seconds)   # 1 thread, then 2
        monkeypatch.setattr(litert_runtime, "_median_invoke_seconds", lambda _: next(calls))
        interpreter, count = litert_runtime.fastest_interpreter(path, max_threads=2)
        assert count == fastest and interpreter.get_signature_list()
    monkeypatch.undo()
    stages = litert_runtime.LiteRTStages(str(exported[0]), "int8", num_threads="auto")
    assert len(stages.threads) == NUM_EXITS
    assert all(1 <= count <= os.cpu_count() for count in stages.threads)
    with pytest.raises(ValueError, match="num_threads must be a positive count"):
        litert_runtime.LiteRTStages(str(exported[0]), "int8", num_threads=0)


def _decisions_match_tensorflow(model, stages, pixels, mean, std, thresholds):
    """Early exit on LiteRT and on TensorFlow, image by image; returns how many were ties."""
    predictor = adaptive.AdaptivePredictor(model)
    litert_predictor = litert_runtime.LiteRTPredictor(stages, thresholds)
    normalized = data.normalize(pixels, mean, std)
    reference = adaptive.all_exit_probabilities(model, normalized)
    confidences = adaptive.confidence(reference)
    ties = 0
    for i, image in enumerate(pixels):
        expected = predictor.predict_one(normalized[i:i + 1],
                                         tf.constant(thresholds, tf.float32))
        klass, exit_, _ = litert_predictor.predict(image)
        reached = int(expected["exits"][0])
        # The exits whose threshold decided this image: every one it passed, and the one it
        # left at (the last exit compares nothing).
        compared = min(reached, len(thresholds) - 1)
        if np.any(np.abs(confidences[:compared, i] - np.float32(thresholds[:compared])) < TIE):
            ties += 1
            continue
        assert (klass, exit_) == (int(expected["classes"][0]), reached), i
    return ties


def test_adaptive_decisions_equal_the_tensorflow_path(exported, stages, splits):
    model = exported[2]
    pixels = splits.test.images[:48]
    probabilities = adaptive.all_exit_probabilities(
        model, data.normalize(pixels, splits.mean, splits.std))
    for q in (0.5, 1.0, 1.5):
        thresholds = calibration.thresholds_for_distribution(adaptive.confidence(probabilities),
                                           calibration.exit_distribution(q, NUM_EXITS))
        # Calibrated on these very images: some confidences equal a threshold exactly, the
        # hardest case for two runtimes; they are counted as ties, not compared.
        ties = _decisions_match_tensorflow(model, stages["fp32"], pixels, splits.mean,
                                           splits.std, thresholds)
        assert ties <= 3, (q, ties)


def test_adaptive_decisions_equal_the_tensorflow_path_on_real_images(exported, stages, splits,
                                                                     real_cifar10):
    real = data.load_splits(DataConfig(dataset="cifar10", data_dir=str(real_cifar10),
                                       validation_size=0))
    pixels = real.train.images[:200]
    thresholds = [float(t) for t in
                  exported[1]["precisions"]["fp32"]["thresholds"]["default"]]
    ties = _decisions_match_tensorflow(exported[2], stages["fp32"], pixels, splits.mean,
                                       splits.std, thresholds)
    assert ties <= 2, ties


_WITHOUT_TENSORFLOW = REFUSE_TENSORFLOW + """
import json
import numpy as np
from ranet.inference.serving import litert_runtime
export_dir, pixels_path, out_path = sys.argv[1:]
pixels = np.load(pixels_path)
stages = litert_runtime.LiteRTStages(export_dir, "fp32", num_threads=1)
answers = litert_runtime.LiteRTPredictor(stages, "default").predict_batch(pixels)
json.dump({"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
           "classes": answers["classes"].tolist(), "exits": answers["exits"].tolist()},
          open(out_path, "w"))
"""


def test_the_runtime_serves_where_tensorflow_cannot_be_imported(exported, stages, splits,
                                                                tmp_path):
    pixels = splits.test.images[:16]
    np.save(tmp_path / "pixels.npy", pixels)
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(exported[0]),
                          str(tmp_path / "pixels.npy"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads((tmp_path / "out.json").read_text())
    assert served["modules"] == []
    expected = litert_runtime.LiteRTPredictor(stages["fp32"], "default").predict_batch(pixels)
    assert served["classes"] == expected["classes"].tolist()
    assert served["exits"] == expected["exits"].tolist()


@pytest.mark.slow  # VGG16's conversions; the fast tier exports RANet, the slow one MobileNetV2 too
def test_a_baseline_is_one_stage(tmp_path):
    write_model_dir(tmp_path / "run", VGG16)
    manifest = litert.export(ExportOptions(model_dir=str(tmp_path / "run"),
                                           export_dir=str(tmp_path / "export"),
                                           format="litert", litert_precision=("fp32",)))
    assert manifest["stages"] == [{"inputs": ["images"], "outputs": ["logits"]}]
    assert manifest["precisions"]["fp32"]["thresholds"]["default"] == ["-inf"]
    stages = litert_runtime.LiteRTStages(str(tmp_path / "export"), "fp32")
    klass, exit_, probabilities = litert_runtime.LiteRTPredictor(stages).predict(
        np.zeros((32, 32, 3), np.uint8))
    assert exit_ == 1 and probabilities.shape == (10,) and klass == probabilities.argmax()


@pytest.mark.slow  # an int8 conversion
def test_mobilenet_v2_runs_wholly_on_xnnpack_in_fp32_and_int8(tmp_path, splits):
    # Depthwise convolutions, ReLU6 and residual additions: each file one XNNPACK delegate.
    model = write_model_dir(tmp_path / "run", ModelConfig(name="mobilenet_v2", num_classes=10))
    litert.export(ExportOptions(model_dir=str(tmp_path / "run"),
                                export_dir=str(tmp_path / "export"), format="litert",
                                representative_images=16))
    pixels = splits.test.images[:8]
    for precision in ("fp32", "int8"):
        stages = litert_runtime.LiteRTStages(str(tmp_path / "export"), precision)
        (interpreter,) = stages.interpreters
        ops = [op["op_name"] for op in interpreter._get_ops_details()]
        assert ops.count("DELEGATE") == 1 and not [op for op in ops if "FLEX" in op.upper()], \
            (precision, ops)
        if precision == "fp32":
            np.testing.assert_allclose(stages.all_exit_logits(pixels),
                                       _tf_logits(model, pixels, splits),
                                       rtol=LOGIT_RTOL, atol=LOGIT_ATOL)


def test_bad_requests_are_refused(exported, tmp_path):
    with pytest.raises(ValueError, match=r"precision must be one of fp32, int8.*'int4'"):
        litert_runtime.LiteRTStages(str(exported[0]), "int4")
    with pytest.raises(FileNotFoundError, match="is not a LiteRT export"):
        litert_runtime.LiteRTStages(str(tmp_path))
    stages = litert_runtime.LiteRTStages(str(exported[0]))
    with pytest.raises(ValueError, match=r"thresholds must be one of default, 2, 3.*'7'"):
        litert_runtime.LiteRTPredictor(stages, "7")
    with pytest.raises(ValueError, match=r"one value per exit \(3\)"):
        litert_runtime.LiteRTPredictor(stages, [0.5, -np.inf])
    with pytest.raises(ValueError, match="litert_precision must be one or more of fp32, int8"):
        ExportOptions(model_dir="a", export_dir="b", litert_precision=("fp16",))


def test_a_budget_is_found_by_its_number_and_keeps_its_exact_value():
    """The manifest keeps 1681.234 as written; "1681.234", "1681.2340" and "1.681234e3" all
    name it, "1681.23" does not (it is another budget)."""
    chosen = {points.DEFAULT: [0.5, 0.5, -np.inf], points.budget(1681.234): [0.7, 0.6, -np.inf],
              points.budget(20): [0.9, 0.8, -np.inf]}
    thresholds = litert.manifest_thresholds(chosen)
    assert set(thresholds["budgets"]) == {"1681.234", "20"}
    stages = SimpleNamespace(num_exits=3, precision="fp32", manifest={
        "confidence": adaptive.MAX_SOFTMAX, "precisions": {"fp32": {"thresholds": thresholds}}})
    for text in ("1681.234", "1681.2340", "1.681234e3"):
        assert litert_runtime.LiteRTPredictor(stages, text).thresholds[:2] == [0.7, 0.6]
    assert litert_runtime.LiteRTPredictor(stages, "20.0").thresholds[:2] == [0.9, 0.8]
    with pytest.raises(ValueError, match="thresholds must be one of default, 1681.234, 20"):
        litert_runtime.LiteRTPredictor(stages, "1681.23")


@pytest.mark.slow
def test_the_eval_measures_the_files_the_export_writes(exported, tmp_path):
    """ranet.eval converts with the export's code and representative images (whatever its
    --seed), so its fp32 and int8 files are the export's, byte for byte."""
    export_dir, manifest, _ = exported
    (loaded,) = model_dir_lib.load_models([str(export_dir.parent / "run")])
    images = report_images.load_images(loaded.config.data, "test", seed=5,
                                       representative_images=64)
    options = comparison.ComparisonOptions(model_dir=(loaded.model_dir,),
                                           runtimes=("tf", "litert", "litert_int8"),
                                           representative_images=64)
    evaluated = comparison.litert_files(loaded, images, options, str(tmp_path))
    for precision in ("fp32", "int8"):
        files = evaluated["precisions"][precision]
        assert files["files"] == manifest["precisions"][precision]["files"]
        for name in files["files"] + list(files["all_exits"].values()):
            assert (tmp_path / name).read_bytes() == (export_dir / name).read_bytes(), name
