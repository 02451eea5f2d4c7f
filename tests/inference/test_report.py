"""ranet.inference.report: report.json keys, the markdown tables and the files written."""

import json

import numpy as np
import pytest

from ranet.inference import comparison, evaluation, report
from ranet.inference.latency import LatencyStats
from helpers import HAND_COST as COST
from helpers import HAND_EXIT_1 as EXIT_1
from helpers import HAND_EXIT_2 as EXIT_2
from helpers import HAND_LABELS as LABELS


@pytest.fixture
def compared():
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    images = evaluation.EvaluationImages("validation", np.zeros((4, 1)), LABELS, "test",
                                         np.zeros((4, 1)), LABELS, num_classes=2)
    result = evaluation.evaluate_exits(probabilities, probabilities, COST, images, name="ranet",
                                       model_dir="/runs/ranet", checkpoint="ckpt-1",
                                       budgets_mflops=(20,))
    stats = {path: LatencyStats(p50=p50, p90=p50 + 1, p99=p50 + 2, mean=p50, num_samples=4)
             for path, p50 in (("full", 3.0), ("adaptive", 2.0), ("adaptive@20", 1.5))}
    return comparison.Comparison(
        images=images, models=[], evaluations=[result], latency={"ranet": stats},
        throughput={"ranet": {16: {"full": 100.0, "adaptive": 180.0, "adaptive@20": 200.0}}})


def test_report_json_keeps_its_schema(compared):
    options = comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16)
    content = report.build(compared, options)
    assert {"split", "calibration_split", "num_images", "device", "tensorflow", "environment",
            "precision", "xla", "confidence", "latency_images", "batch_size", "models"} <= set(content)
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


def test_markdown_and_files(compared, tmp_path):
    options = comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16)
    content = report.build(compared, options)
    text = report.markdown(content, compared.evaluations)
    assert "| ranet | adaptive | 2.00 | 3.00 | 4.00 | 2.00 | 180 |" in text
    assert "| budget 20 M | 15.00 | 75.00% | 75.00% | 0.750, 0.250 | 0.600, -inf |" in text
    written = report.write(content, compared.evaluations, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "report.json", "report.md", "accuracy_vs_macs.png", "accuracy_vs_latency.png"}
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(content))
