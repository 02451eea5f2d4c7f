"""ranet.inference.comparison with two models with exits and a baseline, restored and timed for
real: both models' points at the baseline's accuracy are timed, and the pair is matched."""

import pytest

from helpers import VGG16, write_model_dir
from ranet.inference import comparison, points
from ranet.inference.equal_accuracy import Pair


@pytest.mark.slow  # three models restored, evaluated and timed
def test_every_model_with_exits_is_matched_and_timed(tmp_path):
    sharp, soft, vgg16 = tmp_path / "sharp", tmp_path / "soft", tmp_path / "vgg16"
    write_model_dir(sharp, logit_scale=6.0)
    write_model_dir(soft, logit_scale=3.0)
    write_model_dir(vgg16, VGG16)
    options = comparison.ComparisonOptions(
        model_dir=(str(sharp), str(soft), str(vgg16)), split="test", budget_mflops=(2.0,),
        latency_images=4, warmup=1, throughput_images=16, batch_size=16)
    (compared,) = comparison.compare(options)
    first, second = compared.adaptive_models
    assert (first, second) == ("ranet (sharp)", "ranet (soft)")
    by_pair = compared.at_equal_accuracy["tf"]
    assert list(by_pair) == [Pair(first, "vgg16"), Pair(second, "vgg16"), Pair(first, second)]
    for name in (first, second):
        (matched,) = by_pair[Pair(name, "vgg16")]
        # Timed through its own path, or through a path that has its thresholds.
        assert matched.path in compared.results["tf"][name].latency
        assert matched.target_path == points.FULL
    budgets = compared.at_equal_budget["tf"][Pair(first, second)]
    assert len(budgets) == len(by_pair[Pair(first, second)]) >= 1
    for matched in budgets:
        assert matched.point is None or matched.point.expected_macs <= \
            matched.target.expected_macs
