"""The benchmarks run end to end and report what they promise (numbers, not speed targets)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import VGG16, write_model_dir
from ranet import cli
from ranet import export
from ranet.bench import inference, input as input_bench, litert_stages, profile, routes, train
from ranet.inference import comparison, latency
from ranet.inference.points import DEFAULT, FULL


def _call(binary, *args):
    return cli.call(binary.main, binary.define_flags, [str(a) for a in args])


@pytest.mark.slow
def test_inference_benchmark_prints_and_writes_every_measurement(tmp_path, capsys):
    ranet_dir, vgg_dir = tmp_path / "ranet", tmp_path / "vgg16"
    write_model_dir(ranet_dir, logit_scale=6.0)
    write_model_dir(vgg_dir, VGG16)
    out = tmp_path / "bench.json"
    _call(inference, f"--model_dir={ranet_dir}", f"--model_dir={vgg_dir}", "--split=test",
          "--latency_images=5", "--batch_sizes=1,64", "--throughput_images=16",
          "--runtimes=tf,litert,litert_int8", "--tf_settings=default,one_thread_bfloat16",
          "--pytorch_full_ms=23.4", f"--json={out}")
    result = json.loads(out.read_text())
    # report.json's content (ranet.eval), then the benchmark's own measurements.
    assert result["runtimes"] == ["tf", "litert", "litert_int8"]
    assert result["adaptive_models"] == ["ranet"] and result["pytorch_full_ms"] == 23.4
    views = {model["name"]: model["runtimes"] for model in result["models"]}

    # RANet's point at VGG16's accuracy on each runtime is timed too, unless it is the default.
    def paths(runtime, model):
        return set(views[model][runtime]["latency_ms"]) - {"equal@vgg16"}

    anytime = {"exit_1", "exit_2", "exit_3"}
    assert paths("tf", "ranet") == {"full", "adaptive", "keras_predict", *anytime}
    assert paths("tf", "vgg16") == {"full", "keras_predict"}
    assert paths("litert_int8", "ranet") == {"full", "adaptive", *anytime}
    # The TensorFlow path at other threads and precision, timed by a child process.
    settings = {"default", "one_thread_bfloat16"}
    assert set(result["tf_settings_p50_ms"]) == settings == set(result["tf_settings_accuracy"])
    assert set(result["tf_settings_p50_ms"]["one_thread_bfloat16"]["vgg16"]) == {
        "full", "keras_predict"}
    # The run's own setting: each model's compared path, RANet's default point, VGG16's pass.
    own = result["tf_settings_accuracy"]["default"]
    assert own["ranet"] == views["ranet"]["tf"]["default"]["accuracy"]
    assert own["vgg16"] == views["vgg16"]["tf"]["exits"][-1]["accuracy"]
    # bfloat16 answers nearly as float32 does (the fixture's RANet is confident).
    assert abs(own["ranet"] - result["tf_settings_accuracy"]["one_thread_bfloat16"]["ranet"]) <= 0.1
    point = views["ranet"]["litert"]["default"]
    assert abs(sum(point["exit_fractions"]) - 1.0) < 1e-6
    assert {"accuracy", "expected_macs", "thresholds"} <= set(point)
    assert views["vgg16"]["tf"]["default"] is None
    throughput = result["throughput_ips_by_batch"]
    assert set(throughput["tf"]["ranet"]) == {"1", "64"}
    assert set(throughput["litert"]["ranet"]) == {"1"}
    assert set(throughput["tf"]["ranet"]["64"]) == {"full", "adaptive"}
    assert set(result["best"]) == {"ranet", "vgg16"}
    assert all(set(t) == {"target", "measured", "needed", "unit"} for t in result["targets"])
    targets = [t["target"] for t in result["targets"]]
    for expected in ("best: vgg16", "litert: vgg16 full / ranet adaptive",
                     "tf adaptive / litert adaptive", "reference PyTorch full",
                     "litert full pass MAC/s", "int8 - fp32 accuracy", "fp32 / int8 latency"):
        assert any(expected in t for t in targets), expected
    printed = capsys.readouterr().out
    assert "target" in printed and "b=64" in printed and "one_thread_bfloat16" in printed
    assert "| model | runtime | path | p50 |" in printed


def _fake_model(name, architecture, exit_macs):
    return SimpleNamespace(name=name, config=SimpleNamespace(model=SimpleNamespace(
        name=architecture)), model=SimpleNamespace(num_exits=len(exit_macs)),
        cost=SimpleNamespace(exits=[SimpleNamespace(macs=m) for m in exit_macs]))


def _fake_result(evaluation, p50, throughput):
    stats = {path: latency.LatencyStats(ms, ms, ms, ms, 1) for path, ms in p50.items()}
    return comparison.ModelResult(evaluation, stats, throughput)


def _paths(**by_name):
    """{"full": x, "adaptive": y} keyed by the paths' identities."""
    return {{"full": FULL, "adaptive": DEFAULT}[name]: value for name, value in by_name.items()}


def test_targets_rows_follow_the_declared_list():
    # RANet and VGG16 on TensorFlow and LiteRT fp32: no ResNet50, no int8, so no rows of theirs.
    ranet, vgg = _fake_model("ranet", "ranet", [10, 40]), _fake_model("vgg16", "vgg16", [300])

    def ranet_evaluation(accuracy):
        return SimpleNamespace(is_adaptive=True, exit_accuracy=[0.6, 0.81], default=SimpleNamespace(
            point=SimpleNamespace(accuracy=accuracy, expected_macs=20)))

    def vgg_evaluation(accuracy):
        return SimpleNamespace(is_adaptive=False, exit_accuracy=[accuracy], default=None)

    result = comparison.Comparison(options=None, images=None, models=[ranet, vgg], results={
        "tf": {"ranet": _fake_result(ranet_evaluation(0.8), _paths(full=8, adaptive=4),
                                     {64: _paths(full=100, adaptive=180)}),
               "vgg16": _fake_result(vgg_evaluation(0.7), _paths(full=6), {64: _paths(full=50)})},
        "litert": {"ranet": _fake_result(ranet_evaluation(0.795), _paths(full=4, adaptive=1),
                                         {1: _paths(full=250, adaptive=900)}),
                   # Over 1 point less accurate than on TensorFlow: not VGG16's best.
                   "vgg16": _fake_result(vgg_evaluation(0.65), _paths(full=3),
                                         {1: _paths(full=330)})}})
    best = inference.best_runtimes(result, {"default": {"ranet": {"full": 8, "adaptive": 4},
                                                        "vgg16": {"full": 6}}},
                                   {"default": {"ranet": 0.8, "vgg16": 0.7}})
    assert best == {"ranet": ("litert", 1, 0.795), "vgg16": ("tf (default)", 6, 0.7)}
    rows = inference.targets(result, best, pytorch_full_ms=12.0)
    assert [(r["target"], r["measured"], r["needed"], r["unit"]) for r in rows] == [
        ("best: vgg16 (tf (default)) / ranet adaptive (litert)", 6.0, 2.0, "x"),
        ("litert: vgg16 full / ranet adaptive", 3.0, 3.0, "x"),
        ("ranet: tf adaptive / litert adaptive", 4.0, 4.0, "x"),
        ("ranet: reference PyTorch full / litert adaptive", 12.0, 10.0, "x"),
        # (40 MACs / 4 ms) / (300 MACs / 3 ms)
        ("litert full pass MAC/s: ranet / vgg16", pytest.approx(0.1), 0.4, "x"),
        # 0.8 of the default point's saving, 40 / 20 multiply-adds.
        ("ranet: adaptive / full images/s, tf batch 64 (MAC saving 2.00x)", 1.8,
         pytest.approx(1.6), "x")]


@pytest.mark.slow
def test_training_benchmark_measures_bare_step_loop_and_input(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _call(train, "--presets=ranet_smoke", "--precisions=fp32,mixed_bfloat16", "--steps=3",
          "--warmup_steps=2", "--batch_size=16", f"--json={out}")
    rows = json.loads(out.read_text())["results"]
    assert [r["precision"] for r in rows] == ["fp32", "mixed_bfloat16"]
    for row in rows:
        assert row["bare_ips"] > 0 and row["loop_ips"] > 0 and row["input_ips"] > 0
        assert row["loop_overhead"] == pytest.approx(1 - row["loop_ips"] / row["bare_ips"])
    assert "bare img/s" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("mode, fused_op", [("train", "FusedBatchNormGradV3"),
                                            ("inference", "FusedConv2D")])
def test_profile_attributes_the_step_to_op_types(tmp_path, mode, fused_op):
    out = tmp_path / "profile.json"
    _call(profile, "--preset=ranet_smoke", f"--mode={mode}", "--steps=1", "--warmup_steps=1",
          "--batch_size=8", f"--logdir={tmp_path / 'trace'}", f"--json={out}")
    result = json.loads(out.read_text())
    op_types = result["op_types"]
    # The smoke preset has 33 convolutions; at inference Grappler fuses those it can with
    # their batch norm and ReLU (not the strided ones behind an explicit PyTorch-style Pad),
    # in training the fused batch norm has its fused gradient.
    convolutions = sum(stats["calls_per_step"] for op, stats in op_types.items()
                       if op.endswith("Conv2D"))
    assert convolutions == 33, sorted(op_types)
    assert any(op.endswith(fused_op) for op in op_types), sorted(op_types)
    assert result["ops_per_step"] > 33 and result["wall_ms_per_step"] > 0
    assert list(tmp_path.glob("trace/**/*.xplane.pb"))


@pytest.mark.slow  # a benchmark
def test_input_benchmark_generates_jpegs_and_times_both_modes(tmp_path, capsys):
    out = tmp_path / "input.json"
    returned = _call(input_bench, "--images=64", "--shards=2", "--batch_size=8", "--batches=2",
                     "--warmup_batches=1", "--step_presets=ranet_smoke", "--step_batch_size=4",
                     "--steps=1", "--gpu_tflops=100", f"--json={out}")
    rows = returned["results"]
    assert [row["mode"] for row in rows] == ["local", "service"]
    assert all(row["images_per_second"] > 0 for row in rows)
    result = json.loads(out.read_text())
    assert result["images"] == 64 and result["cores"] >= 1
    # The GPU estimate: the CPU step's share of the CPU's peak, applied to 100 TFLOP/s.
    (need,) = result["gpu_input"]
    assert need["preset"] == "ranet_smoke" and need["cpu_step_images_per_second"] > 0
    flops_per_image = 6 * need["macs"]
    assert need["estimated_gpu_images_per_second"] == pytest.approx(
        need["cpu_peak_share"] * 100e12 / flops_per_image)
    assert need["cores_per_gpu"] == pytest.approx(
        need["estimated_gpu_images_per_second"] / rows[0]["images_per_second_per_core"])
    printed = capsys.readouterr().out
    assert "64 images" in printed and "per core" in printed and "service" in printed
    assert "ESTIMATE" in printed and "cores/GPU" in printed


def test_stage_cost_fit_recovers_a_hand_made_cost():
    ops, macs = [120, 40, 60, 30], [2e6, 9e6, 1e6, 4e6]
    ms = [0.03 * o + m / 5e9 * 1e3 for o, m in zip(ops, macs)]  # 30 us per op, 5 GMAC/s
    fit = litert_stages.fit_costs(ops, macs, ms)
    assert fit["us_per_op"] == pytest.approx(30.0)
    assert fit["gmacs_per_s"] == pytest.approx(5.0)


@pytest.mark.slow
def test_stage_benchmark_times_and_counts_every_stage(tmp_path, capsys):
    model_dir, export_dir = tmp_path / "ranet", tmp_path / "litert"
    write_model_dir(model_dir)
    manifest = _call(export, f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                     "--format=litert", "--litert_precision=fp32")
    result = _call(litert_stages, f"--export_dir={export_dir}", "--precisions=fp32",
                   "--threads=1", "--images=3", "--warmup=1", "--between=nothing,both",
                   "--sleep_ms=1", "--flush_mb=8")
    run, cold = result["results"]
    assert (run["between"], cold["between"]) == ("nothing", "both")
    assert [s["stage"] for s in cold["stages"]] == [s["stage"] for s in run["stages"]]
    assert [s["stage"] for s in run["stages"]] == list(range(1, manifest["num_exits"] + 1))
    assert sum(s["macs"] for s in run["stages"]) == manifest["exit_macs"][-1]
    for stage in run["stages"]:
        assert stage["operators"]["CONV_2D"] > 0 and stage["ops"] >= stage["operators"]["CONV_2D"]
        assert stage["p50_ms"] > 0
    assert set(run["fit"]) == {"us_per_op", "gmacs_per_s"}
    assert run["chained_p50_ms"] > 0 and run["one_graph_p50_ms"] > 0
    assert run["chained_over_one_graph"] == pytest.approx(
        run["chained_p50_ms"] / run["one_graph_p50_ms"])
    printed = capsys.readouterr().out
    assert "us per op" in printed and "every exit: stage files in order" in printed


def test_chain_and_one_graph_are_timed_in_turns_on_the_same_images():
    class Stages:
        num_exits, calls = 2, []

        def run_stage(self, k, image):
            self.calls.append(("stage", k, int(image[0])))

        def every_exit(self, image):
            self.calls.append(("one graph", int(image[0])))

    stages = Stages()
    chained, one_graph = litert_stages.time_chain_and_one_graph(
        stages, np.arange(3).reshape(3, 1), warmup=1)
    assert chained > 0 and one_graph > 0
    # Image 0 (warm-up) chain first, image 0 one graph first, then the chain first again.
    assert stages.calls == [("stage", 0, 0), ("stage", 1, 0), ("one graph", 0),
                            ("one graph", 0), ("stage", 0, 0), ("stage", 1, 0),
                            ("stage", 0, 1), ("stage", 1, 1), ("one graph", 1),
                            ("one graph", 2), ("stage", 0, 2), ("stage", 1, 2)]


def test_between_images_sleeps_or_reads_other_memory(monkeypatch):
    slept = []
    monkeypatch.setattr(litert_stages.time, "sleep", slept.append)
    litert_stages.between_images("sleep", sleep_ms=20, flush_mb=1)()
    litert_stages.between_images("flush", sleep_ms=20, flush_mb=1)()
    litert_stages.between_images("both", sleep_ms=5, flush_mb=1)()
    assert slept == [0.02, 0.005]
    with pytest.raises(ValueError, match="--between takes some of nothing, sleep, flush, both"):
        litert_stages.between_images("idle", sleep_ms=1, flush_mb=1)


def test_stage_cost_fit_says_when_time_does_not_grow_with_arithmetic():
    # Time set by the ops alone, less where the arithmetic is larger: no positive MAC cost.
    fit = litert_stages.fit_costs([10, 20, 40], [9e6, 1e6, 2e6], [0.25, 0.60, 1.2])
    assert fit["gmacs_per_s"] is None and fit["us_per_op"] > 0


@pytest.mark.slow  # a benchmark: an evaluation and an int8 conversion
def test_routes_benchmark_times_every_point_both_ways(tmp_path, capsys):
    model_dir = tmp_path / "ranet"
    write_model_dir(model_dir, logit_scale=6.0)
    out = tmp_path / "routes.json"
    rows = _call(routes, f"--model_dir={model_dir}", "--split=test", "--latency_images=4",
                 "--warmup=1", "--runtimes=tf,litert_int8", "--budget_mflops=3",
                 "--representative_images=16", f"--json={out}")
    assert {(row["runtime"], row["point"]) for row in rows} == {
        (runtime, point) for runtime in ("tf", "litert_int8") for point in ("adaptive", "budget@3")}
    for row in rows:
        assert 1 <= row["route"] <= 3
        for way in (routes.STAGE_BY_STAGE, routes.ROUTE):
            timed = row[way]
            assert timed["num_samples"] == 4 and abs(sum(timed["exit_fractions"]) - 1) < 1e-9
            assert timed["overhead"] == pytest.approx(timed["mean"] / timed["expected_ms"])
        # Both ways leave the same images at the same exits: one expected time.
        assert row[routes.ROUTE]["expected_ms"] == row[routes.STAGE_BY_STAGE]["expected_ms"]
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(rows)) and written["cpu"]
    assert "CPU:" in capsys.readouterr().out
