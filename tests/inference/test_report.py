"""ranet.inference.report: report.json keys, the markdown tables and the files written."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from ranet.inference import comparison, evaluation, report
from ranet.inference.latency import LatencyStats
from helpers import HAND_COST as COST
from helpers import HAND_EXIT_1 as EXIT_1
from helpers import HAND_EXIT_2 as EXIT_2
from helpers import hand_images


@pytest.fixture
def compared():
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    images = hand_images()
    result = evaluation.evaluate_exits(probabilities, probabilities, COST, images, name="ranet",
                                       model_dir="/runs/ranet", checkpoint="ckpt-1",
                                       budgets_mflops=(20,))
    int8 = evaluation.evaluate_exits(probabilities[:, [0, 0, 2, 3]], probabilities, COST, images,
                                     name="ranet", model_dir="/runs/ranet", checkpoint="ckpt-1",
                                     budgets_mflops=(20,))

    def stats(scale):
        return {path: LatencyStats(p50=scale * p50, p90=scale * p50 + 1, p99=scale * p50 + 2,
                                   mean=scale * p50, num_samples=4)
                for path, p50 in (("full", 3.0), ("adaptive", 2.0), ("adaptive@20", 1.5))}

    loaded = SimpleNamespace(name="ranet")
    return comparison.Comparison(images=images, models=[loaded], results={
        "tf": {"ranet": comparison.ModelResult(
            result, stats(1.0), {16: {"full": 100.0, "adaptive": 180.0, "adaptive@20": 200.0}})},
        "litert_int8": {"ranet": comparison.ModelResult(
            int8, stats(0.1), {1: {"full": 900.0, "adaptive": 1500.0, "adaptive@20": 1800.0}})}})


def test_report_json_keeps_its_schema(compared):
    options = comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16)
    content = report.build(compared, options)
    assert {"split", "calibration_split", "num_images", "device", "tensorflow", "environment",
            "precision", "xla", "confidence", "latency_images", "batch_size", "models",
            "runtimes"} <= set(content)
    assert (content["split"], content["calibration_split"], content["num_images"]) == (
        "test", "validation", 4)
    (model,) = content["models"]
    assert model["exits"] == [{"exit": 1, "macs": 10_000_000, "accuracy": 0.5},
                              {"exit": 2, "macs": 30_000_000, "accuracy": 1.0}]
    assert model["default"]["thresholds"] == [pytest.approx(0.9), "-inf"]
    assert model["latency_ms"]["adaptive"]["p50"] == 2.0
    assert model["throughput_ips"] == {"full": 100.0, "adaptive": 180.0, "adaptive@20": 200.0}
    assert model["exit_distribution"]["overall"] == [0.25, 0.75]
    assert sum(1 for point in model["budgeted"] if "q" in point) == 39
    # Another runtime: the same fields, its own thresholds and numbers.
    int8 = model["runtimes"]["litert_int8"]
    assert set(int8) == {"latency_ms", "exits", "budgeted", "default", "throughput_ips"}
    assert int8["latency_ms"]["adaptive"]["p50"] == pytest.approx(0.2)
    assert int8["throughput_ips"]["adaptive"] == 1500.0
    assert [e["accuracy"] for e in int8["exits"]] == [0.5, 1.0]


def test_markdown_and_files(compared, tmp_path):
    options = comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16)
    content = report.build(compared, options)
    text = report.markdown(content)
    assert "| ranet | tf | adaptive | 2.00 | 3.00 | 4.00 | 2.00 | 180 |" in text
    assert "| ranet | litert_int8 | adaptive | 0.20 | 1.20 | 2.20 | 0.20 | 1500 |" in text
    assert "| budget 20 M | 15.00 | 75.00% | 75.00% | 0.750, 0.250 | 0.600, -inf |" in text
    assert "## ranet: operating points (litert_int8)" in text
    assert "| exit | MMACs | tf | litert_int8 |" in text
    written = report.write(content, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "report.json", "report.md", "accuracy_vs_macs.png", "accuracy_vs_latency.png"}
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(content))
