"""The benchmarks run end to end and report what they promise (numbers, not speed targets)."""

import json

import pytest

from helpers import VGG16, write_model_dir
from ranet import cli
from ranet import export
from ranet.bench import inference, input as input_bench, litert_stages, profile, train


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
    # RANet's point at VGG16's accuracy on each runtime is timed too, unless it is the default.
    def paths(runtime, model):
        return set(result["latency_ms"][runtime][model]) - {"equal@vgg16"}

    assert paths("tf", "ranet") == {"full", "adaptive", "keras_predict"}
    assert paths("tf", "vgg16") == {"full", "keras_predict"}
    assert paths("litert_int8", "ranet") == {"full", "adaptive"}
    # The TensorFlow path at other threads and precision, timed by a child process.
    settings = {"default", "one_thread_bfloat16"}
    assert set(result["tf_settings_p50_ms"]) == settings == set(result["tf_settings_accuracy"])
    assert set(result["tf_settings_p50_ms"]["one_thread_bfloat16"]["vgg16"]) == {
        "full", "keras_predict"}
    # bfloat16 answers nearly as float32 does (the fixture's RANet is confident).
    fp32, bf16 = (result["tf_settings_accuracy"][s]["ranet"] for s in sorted(settings))
    assert abs(fp32 - bf16) <= 0.1
    point = result["operating_points"]["litert"]["ranet"]
    assert abs(sum(point["exit_fractions"]) - 1.0) < 1e-6
    assert {"accuracy", "last_exit_accuracy", "expected_macs", "thresholds"} <= set(point)
    assert "vgg16" not in result["operating_points"]["tf"]
    assert set(result["throughput_ips"]["tf"]["ranet"]) == {"1", "64"}
    assert set(result["throughput_ips"]["litert"]["ranet"]) == {"1"}
    assert set(result["throughput_ips"]["tf"]["ranet"]["64"]) == {"full", "adaptive"}
    assert set(result["best"]) == {"ranet", "vgg16"}
    targets = [t["target"] for t in result["targets"]]
    for expected in ("best: vgg16", "litert: vgg16 full / ranet adaptive",
                     "tf adaptive / litert adaptive", "reference PyTorch full",
                     "litert full pass MAC/s", "int8 - fp32 accuracy", "fp32 / int8 latency"):
        assert any(expected in t for t in targets), expected
    printed = capsys.readouterr().out
    assert "target" in printed and "b=64" in printed and "one_thread_bfloat16" in printed


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
    assert "us per op" in capsys.readouterr().out


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
