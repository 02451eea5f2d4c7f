"""A shrunken ImageNet RANet trains from TFRecord shards (issue 13): 224x224, 1000 classes."""

import json
import os

import numpy as np
import pytest

from ranet import cli
from ranet.training import train_and_evaluate
from tests.data.test_imagenet import write_shards

# The reference's ImageNet layout (7x7/2 stem, max-pool, wide heads), widths reduced.
SHRUNKEN_IMAGENET_RANET = [
    "--model=ranet", "--dataset=imagenet", "--scale_list=1-2-3-4", "--growth_factors=4-2-1-1",
    "--bottleneck_factors=4-2-1-1", "--base_channels=4", "--growth_rate=4", "--num_blocks=1",
    "--block_step=1", "--step=2"]


def imagenet_config(data_dir, model_dir, *extra):
    from absl import flags
    values = flags.FlagValues()
    cli.define_config_flags(values)
    values(["train", *SHRUNKEN_IMAGENET_RANET, f"--data_dir={data_dir}",
            f"--model_dir={model_dir}", "--validation_size=6", "--batch_size=4",
            "--train_steps=3", "--log_every_steps=1", "--checkpoint_every_steps=3",
            "--deterministic", *extra])
    return cli.experiment_config(values)


@pytest.mark.slow  # ImageNet-sized images through training, eval and export
def test_three_steps_on_tfrecord_shards_then_a_resume(tmp_path):
    data_dir = write_shards(tmp_path / "imagenet")
    config = imagenet_config(data_dir, tmp_path / "model", "--strategy=one_device")
    assert config.model.imagenet and config.model.image_size == 224
    result = train_and_evaluate(config)
    assert result["step"] == 3
    validation = result["validation"]
    assert validation["examples"] == 6  # the class-balanced hold-out, each image once
    assert np.isfinite(validation["loss/exit_4"])
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["data"]["dataset"] == "imagenet" and saved["model"]["imagenet"] is True
    assert sorted(os.listdir(tmp_path / "model" / "checkpoints"))[0] == "best"
    resumed = train_and_evaluate(imagenet_config(data_dir, tmp_path / "model",
                                                 "--strategy=one_device", "--train_steps=5"))
    assert resumed["step"] == 5


@pytest.mark.slow  # ImageNet-sized images through training, eval and export
def test_an_imagenet_model_is_evaluated_exported_and_served(tmp_path):
    data_dir = write_shards(tmp_path / "imagenet")
    write_shards(data_dir, "validation")
    model_dir = tmp_path / "model"
    train_and_evaluate(imagenet_config(data_dir, model_dir, "--strategy=one_device"))

    from ranet import eval as eval_binary
    from ranet import export as export_binary
    report = cli.call(eval_binary.main, eval_binary.define_flags, [
        f"--model_dir={model_dir}", f"--report_dir={tmp_path / 'report'}", "--split=test",
        "--runtimes=tf,litert", "--latency_images=2", "--warmup=0", "--batch_size=8",
        "--throughput_images=8", "--max_images=12"])
    assert report["num_images"] == 12  # a class-balanced sample of the 24 test images
    (entry,) = report["models"]
    tf_view = entry["runtimes"]["tf"]
    assert [e["exit"] for e in tf_view["exits"]] == [1, 2, 3, 4]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in tf_view["exits"])
    assert len(tf_view["exit_distribution"]["per_class"]) == 1000
    assert entry["runtimes"]["litert"]["latency_ms"]["adaptive"]["p50"] > 0

    cli.call(export_binary.main, export_binary.define_flags, [
        f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'litert'}", "--format=litert",
        "--litert_precision=fp32"])
    cli.call(export_binary.main, export_binary.define_flags, [
        f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'saved_model'}"])

    # Served answers: the LiteRT stages compute the restored model's softmax on 224x224 images.
    import tensorflow as tf
    from ranet import data
    from ranet.inference import adaptive
    from ranet.inference.serving import litert_runtime
    from ranet.training import model_dir as model_dir_lib
    config, model, _ = model_dir_lib.restore_model(str(model_dir), "latest")
    splits = data.load_splits_in_memory(config.data, max_images=3, train_images=1)
    pixels = splits.test.images
    assert pixels.shape == (3, 224, 224, 3) and pixels.dtype == np.uint8
    expected = adaptive.all_exit_probabilities(
        model, data.normalize(pixels, splits.mean, splits.std), 3)
    stages = litert_runtime.LiteRTStages(str(tmp_path / "litert"), "fp32")
    assert stages.manifest["input"]["shape"] == [1, 224, 224, 3]
    served = litert_runtime.softmax(stages.all_exit_logits(pixels))
    assert served.shape == (4, 3, 1000)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    serving = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    answers = serving(images=tf.constant(pixels, tf.float32))
    assert answers["probabilities"].shape == (3, 1000)
    assert set(answers["exits"].numpy().tolist()) <= {1, 2, 3, 4}
