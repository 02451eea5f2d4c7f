"""ranet.bench.head_to_head checks the evaluation's flags as ranet.eval does, before any
model trains (the contest binary's run end to end is tests/end_to_end/test_head_to_head.py)."""

import pytest

from ranet import cli
from ranet.bench import head_to_head
from ranet.errors import UsageError


def _call(*args):
    return cli.call(head_to_head.main, head_to_head.define_flags, list(args))


@pytest.mark.parametrize("args, message", [
    (["--latency_blocks=1,1"], "--latency_block takes distinct positive integers"),
    (["--runtimes=tf,onnx"], "runtimes must include tf"),
    (["--eval_flag=--litert_threads=many"], "--litert_threads takes a count of threads"),
    (["--eval_flag=--no_such_flag=1"], "are not ranet.eval's"),
    (["--models=ranet,alexnet"], "--models takes distinct names"),
    (["--time_budget=soon"], "time_budget"),
])
def test_what_the_evaluation_would_refuse_fails_before_any_training(tmp_path, args, message):
    out = tmp_path / "contest"
    with pytest.raises(UsageError, match=message):
        _call(f"--out={out}", *args)
    assert not out.exists()


def test_the_evaluation_runs_with_the_options_checked_up_front(tmp_path):
    values = cli.call(lambda values: values, head_to_head.define_flags,
                      [f"--out={tmp_path}", "--runtimes=litert_int8,tf",
                       "--eval_flag=--latency_images=4"])
    options = head_to_head.eval_options(values, [str(tmp_path / "ranet")])
    assert options.runtimes == ("tf", "litert_int8") and options.latency_images == 4
    assert options.latency_block == (1, 10) and options.split == "test"


def test_the_trainings_do_not_repeat_tensorflows_start_up_lines(capfd):
    """A child's own output comes through; the lines every TensorFlow process prints as it
    starts do not."""
    head_to_head._run(["ranet.summary", "--preset=ranet_smoke"], "a child with TensorFlow")
    printed = capfd.readouterr()
    assert "ranet: 522,676 parameters" in printed.out
    assert "oneDNN custom operations" not in printed.err
    assert "absl::InitializeLog" not in printed.err
