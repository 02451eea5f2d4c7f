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


def _write_events(folder, events):
    """An event file of (wall_time, step, {tag: value}) records, as a summary writer's."""
    import tensorflow as tf
    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "events.out.tfevents.0.host")) as writer:
        for wall_time, step, values in events:
            summary = tf.compat.v1.Summary(value=[
                tf.compat.v1.Summary.Value(tag=tag, simple_value=value)
                for tag, value in values.items()])
            writer.write(tf.compat.v1.Event(wall_time=wall_time, step=step,
                                            summary=summary).SerializeToString())


def test_training_curves_put_validation_accuracy_against_seconds_since_the_start(tmp_path):
    import json
    model_dir = tmp_path / "models" / "ranet"
    _write_events(model_dir / "train", [(1000.0, 5, {"loss/total": 2.0})])
    _write_events(model_dir / "validation", [
        (1060.0, 100, {"accuracy/exit_1": 0.3, "accuracy/exit_2": 0.4, "loss/exit_1": 2.0}),
        (1150.0, 200, {"accuracy/exit_1": 0.5, "accuracy/exit_2": 0.6})])
    never_trained = tmp_path / "models" / "msdnet"
    paths = head_to_head.plot_training_curves(str(tmp_path), {
        "ranet": str(model_dir), "msdnet": str(never_trained)})
    assert [p.rsplit("/", 1)[1] for p in paths] == ["training_curves.png",
                                                    "training_curves.json"]
    curves = json.loads((tmp_path / "report" / "training_curves.json").read_text())
    assert curves == {"ranet": {"accuracy/exit_1": [[60.0, pytest.approx(0.3)],
                                                    [150.0, pytest.approx(0.5)]],
                                "accuracy/exit_2": [[60.0, pytest.approx(0.4)],
                                                    [150.0, pytest.approx(0.6)]]}}
    assert head_to_head.plot_training_curves(str(tmp_path / "none"), {}) == []


def test_training_curves_read_what_the_trainer_writes(tmp_path):
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(tmp_path / "validation"))
    with writer.as_default():
        tf.summary.scalar("accuracy/exit_1", 0.25, step=10)
    writer.close()
    curves = head_to_head.validation_curves(str(tmp_path))
    (seconds, accuracy), = curves["accuracy/exit_1"]
    assert seconds == 0.0 and accuracy == pytest.approx(0.25)
