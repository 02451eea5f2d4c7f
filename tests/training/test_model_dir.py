"""ranet.training.model_dir: checks before writing, the best checkpoint, restoring."""

import dataclasses

import pytest
import tensorflow as tf

from helpers import SMOKE, TINY_RANET, write_model_dir
from ranet import config as config_lib
from ranet.training import model_dir


def _config(directory, **model_changes) -> config_lib.ExperimentConfig:
    return dataclasses.replace(SMOKE, model=dataclasses.replace(TINY_RANET, **model_changes),
                               runtime=config_lib.RuntimeConfig(model_dir=str(directory)))


def test_an_unreadable_checkpoint_state_file_falls_back_to_the_files(tmp_path):
    for number in (5, 12, 7):
        (tmp_path / f"ckpt-{number}.index").write_bytes(b"")
    (tmp_path / "ckpt-best.index").write_bytes(b"")
    (tmp_path / "checkpoint").write_text("model_checkpoint_path: {{{ not a text proto")
    assert model_dir.candidates(str(tmp_path)) == [
        str(tmp_path / f"ckpt-{number}") for number in (12, 7, 5)]


def test_restoring_a_model_dir_without_checkpoints_says_to_train_it_first(tmp_path):
    write_model_dir(tmp_path, with_checkpoint=False)
    with pytest.raises(FileNotFoundError, match="train it first"):
        model_dir.restore_model(str(tmp_path))


def test_restore_model_rebuilds_the_saved_weights(tmp_path):
    saved = write_model_dir(tmp_path)
    config, model, path = model_dir.restore_model(str(tmp_path), "latest")
    assert config.model == TINY_RANET and path.endswith("ckpt-1")
    for variable, expected in zip(model.variables, saved.variables):
        assert variable.path == expected.path
        tf.debugging.assert_equal(variable, expected)
    with pytest.raises(ValueError, match=r"checkpoint must be one of best, latest"):
        model_dir.restore_model(str(tmp_path), "newest")


def test_a_corrupt_config_json_is_named_with_how_to_fix_it(tmp_path):
    write_model_dir(tmp_path, with_checkpoint=False)
    (tmp_path / "config.json").write_text('{"data": \n')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*restore it") as error:
        model_dir.restore_model(str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value)
    (tmp_path / "config.json").write_text('{"data": {}, "model": {"colour": 1}}')
    with pytest.raises(ValueError, match=r"does not hold a valid configuration"):
        config_lib.load(str(tmp_path))


def test_check_model_dir_refuses_another_model_and_another_split(tmp_path):
    write_model_dir(tmp_path, with_checkpoint=False)
    model_dir.check_model_dir(_config(tmp_path))  # the same experiment: resumable
    with pytest.raises(ValueError, match=r"another model configuration.*growth_rate"):
        model_dir.check_model_dir(_config(tmp_path, growth_rate=6))
    other_split = dataclasses.replace(
        _config(tmp_path), data=dataclasses.replace(SMOKE.data, split_seed=1))
    with pytest.raises(ValueError, match=r"different data split"):
        model_dir.check_model_dir(other_split)


def test_checkpoints_without_a_config_are_refused(tmp_path):
    write_model_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="holds checkpoints but no config.json"):
        model_dir.check_model_dir(_config(tmp_path))


def test_best_checkpoint_keeps_only_improvements_and_reads_the_chiefs_record(tmp_path):
    variable = tf.Variable(1.0)
    checkpoint = tf.train.Checkpoint(v=variable)
    best = model_dir.BestCheckpoint(checkpoint, str(tmp_path / "best"), str(tmp_path / "best"))
    assert best.update(0.5, step=10, write_record=True)
    variable.assign(2.0)
    assert not best.update(0.4, step=20, write_record=True)
    assert best.update(0.6, step=30, write_record=True)
    assert tf.train.latest_checkpoint(str(tmp_path / "best")).endswith("ckpt-30")
    # Another worker (or a resumed run) starts from the chief's record.
    again = model_dir.BestCheckpoint(checkpoint, str(tmp_path / "other"), str(tmp_path / "best"))
    assert again.best == 0.6 and not again.update(0.55, step=40, write_record=False)


def test_model_dir_under_a_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=r"is not writable \(part of the path is a file"):
        model_dir.check_model_dir(_config(tmp_path / "file" / "run"))
