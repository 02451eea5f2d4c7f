"""A trained model as LiteRT files, one per stage, for CPUs and edge devices (TensorFlow side).

``python -m ranet.export --format=litert --model_dir=... --export_dir=...`` writes

    <export_dir>/manifest.json            stages, tensor names, costs, normalisation,
                                          thresholds per precision and how they were chosen
    <export_dir>/fp32/stage<k>.tflite     float32
    <export_dir>/int8/stage<k>.tflite     full-integer post-training quantisation
    <export_dir>/<precision>/all_exits.tflite           every exit in one graph, batch 1
    <export_dir>/<precision>/all_exits_batch<N>.tflite  the same at a static batch of N
    <export_dir>/<precision>/exits_1_to_<k>.tflite      exits 1..k in one graph, batch 1

Stage k reads the features it needs (stage 1: raw RGB pixels, float32 [1, H, W, 3] in 0..255,
normalised inside) and returns its exit's logits and the features later stages read, all
float32 with a static batch of 1. Only builtin ops: no Flex or Select-TF. A baseline is one
stage. The all-exits files take the raw pixels and return every exit's logits
(``exit<k>_logits``): where every exit is needed (the ``full`` path, calibration, accuracy
over a split) one graph costs less than the stage files chained (a model of several
stages), and a batch of N far less again per image; exits 1..k in one graph time the network
up to exit k, the cost early exit has to beat. ``litert_runtime`` runs the files with
nothing but ``ai-edge-litert`` and numpy.

How the graphs are made: the model is rebuilt in the serving layout (``models.layers``: no
channel slices across stages, pooling as a depthwise convolution, so that int8 runs wholly on
XNNPACK) with the trained weights; each stage is traced with ``training=False``, its variables
frozen into constants (batch norm then folds into the convolutions), saved as a SavedModel
signature (which names the tensors) and converted.
"""

import dataclasses
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from ranet import data, devices, jsonio, models
from ranet.config import check_choice
from ranet.data import report_images
from ranet.inference import points
from ranet.inference.points import Kind, PointId
from ranet.inference.serving import exporting, litert_runtime
from ranet.models.layers import serving_layout
from ranet.models.staged import IMAGES, LOGITS

SIGNATURE = litert_runtime.SIGNATURE
# The static batch of the batched all-exits file: accuracy passes over a split run 32 images
# per call.
ACCURACY_BATCH = 32


@dataclasses.dataclass(frozen=True)
class StageGraph:
    """One stage as a LiteRT file: its bytes and the names of its input and output tensors."""
    content: bytes
    inputs: List[str]
    outputs: List[str]


def serving_model(model: models.StagedClassifier, model_config) -> models.StagedClassifier:
    """``model`` rebuilt in the serving layout, with its weights (matched by variable path)."""
    with serving_layout():
        served = models.get_model(model_config)
    weights = {variable.path: variable for variable in model.variables}
    missing = [v.path for v in served.variables if v.path not in weights]
    if missing:
        raise ValueError(f"the serving layout has variables the model lacks: {missing[:5]}")
    for variable in served.variables:
        variable.assign(weights[variable.path])
    return served


def _stage_function(model: models.StagedClassifier, k: int, mean, std):
    """Stage k as a function of a dict of batch-1 inputs; stage 1 takes raw pixels."""
    stage = model.stages[k]
    read_later = set().union(*map(set, model.stage_inputs[k + 1:]))
    features = sorted(name for name in stage.output if name != LOGITS and name in read_later)

    def run(inputs):
        inputs = dict(inputs)
        if IMAGES in inputs:
            inputs[IMAGES] = data.normalize(inputs[IMAGES], mean, std)
        outputs = stage(inputs, training=False)
        return {LOGITS: outputs[LOGITS], **{name: outputs[name] for name in features}}

    specs = {name: tf.TensorSpec([1, *stage.input[name].shape[1:]], tf.float32, name=name)
             for name in model.stage_inputs[k]}
    return run, specs


def _all_exits_function(model: models.StagedClassifier, mean, std, batch_size: int,
                        num_exits: Optional[int] = None):
    """The stages up to exit ``num_exits`` (default: every one) in order, features cached as
    the stage files pass them; returns those exits' logits. Takes raw pixels
    [batch_size, H, W, 3]."""
    def run(inputs):
        features = {IMAGES: data.normalize(inputs[IMAGES], mean, std)}
        logits = {}
        for k, stage in enumerate(model.stages[:num_exits or model.num_exits]):
            outputs = stage({name: features[name] for name in model.stage_inputs[k]},
                            training=False)
            logits[litert_runtime.exit_logits_name(k)] = outputs[LOGITS]
            features.update({name: value for name, value in outputs.items() if name != LOGITS})
        return logits

    specs = {IMAGES: tf.TensorSpec([batch_size, *model.image_shape], tf.float32, name=IMAGES)}
    return run, specs


def _frozen_saved_model(run, specs, directory: str) -> None:
    """Saves ``run`` with its variables frozen into constants, as the default signature."""
    concrete = tf.function(run).get_concrete_function(specs)
    frozen = convert_variables_to_constants_v2(concrete)

    # Freezing flattens the outputs; the signature names them again (tf.nest order).
    @tf.function(input_signature=[specs])
    def serve(inputs):
        return tf.nest.pack_sequence_as(concrete.structured_outputs,
                                        frozen(*tf.nest.flatten(inputs)))

    tf.saved_model.save(tf.Module(), directory, signatures={SIGNATURE: serve})


def stage_inputs_on(model: models.StagedClassifier, pixels: np.ndarray, mean,
                    std) -> List[Dict[str, np.ndarray]]:
    """What each stage of ``model`` reads on ``pixels`` (uint8 [N, H, W, 3]), batch first."""
    features = {IMAGES: data.normalize(pixels, mean, std)}
    per_stage = []
    for k in range(model.num_exits):
        per_stage.append({name: (pixels.astype(np.float32) if name == IMAGES else features[name])
                          for name in model.stage_inputs[k]})
        _, new_features = model.run_stage(k, features)
        features.update({name: value.numpy() for name, value in new_features.items()})
    return per_stage


def _convert(run, specs, precision: str, representative, scratch: str) -> StageGraph:
    """One traced function as LiteRT bytes; int8 is calibrated on ``representative`` (a
    function yielding input dicts)."""
    directory = tempfile.mkdtemp(dir=scratch)
    _frozen_saved_model(run, specs, directory)
    converter = tf.lite.TFLiteConverter.from_saved_model(directory)
    if precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    else:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    content = converter.convert()
    signature = litert_runtime.signature_names(content)
    return StageGraph(content, inputs=signature["inputs"], outputs=signature["outputs"])


def convert(model: models.StagedClassifier, mean, std, precision: str,
            representative: Sequence[Dict[str, np.ndarray]] = ()) -> List[StageGraph]:
    """Every stage of a serving-layout model as LiteRT bytes.

    Args:
        model: from ``serving_model``.
        mean, std: the training split's statistics (0..1 units); stage 1 normalises with them.
        precision: "fp32", or "int8" (full-integer quantisation with float32 inputs and
            outputs, calibrated on ``representative``: what each stage reads on training
            images, from ``stage_inputs_on``).
    """
    check_choice("litert_precision", precision, litert_runtime.PRECISIONS)
    with tempfile.TemporaryDirectory(prefix="ranet_litert_") as scratch:
        return [_convert(*_stage_function(model, k, mean, std), precision,
                         _representative(representative[k]) if precision == "int8" else None,
                         scratch)
                for k in range(model.num_exits)]


def convert_all_exits(model: models.StagedClassifier, mean, std, precision: str,
                      batch_size: int, pixels: Optional[np.ndarray] = None,
                      num_exits: Optional[int] = None) -> StageGraph:
    """Every exit of a serving-layout model (or exits 1..``num_exits``) in one graph at a
    static ``batch_size``; int8 is calibrated on the raw ``pixels`` [N, H, W, 3] the stages
    were calibrated on (the same activations, so the same ranges)."""
    check_choice("litert_precision", precision, litert_runtime.PRECISIONS)
    representative = None
    if precision == "int8":
        pixels = np.asarray(pixels, np.float32)
        # Whole batches, the last one filled up from the first images.
        rows = np.arange(-(-len(pixels) // batch_size) * batch_size) % len(pixels)
        representative = _representative({IMAGES: pixels[rows]}, batch_size)
    with tempfile.TemporaryDirectory(prefix="ranet_litert_") as scratch:
        return _convert(*_all_exits_function(model, mean, std, batch_size, num_exits),
                        precision, representative, scratch)


def _representative(inputs: Dict[str, np.ndarray], batch_size: int = 1):
    def samples() -> Iterator[Dict[str, np.ndarray]]:
        for i in range(0, len(next(iter(inputs.values()))), batch_size):
            yield {name: values[i:i + batch_size] for name, values in inputs.items()}
    return samples


def manifest_thresholds(chosen: Dict[PointId, Sequence[float]]) -> dict:
    """The manifest's thresholds of one precision: ``{"default": [K], "budgets": {"<b>": [K]},
    "fixed": [K]}``, each budget under its exact value (``points.exact``)."""
    named = {"budgets": {}}
    for point, values in chosen.items():
        values = [jsonio.number(t) for t in values]
        if point.kind == Kind.BUDGET:
            named["budgets"][points.exact(point.value)] = values
        else:
            named[{Kind.DEFAULT: "default", Kind.FIXED: "fixed"}[point.kind]] = values
    return named


def calibrated_thresholds(stages: litert_runtime.LiteRTStages, splits: data.DataSplits,
                          exit_macs: Sequence[int], options: exporting.ExportOptions) -> dict:
    """The default point's thresholds and each budget's (and the fixed one's, if asked for).

    Calibrated on the whole validation split, as the SavedModel's are, but on these stages'
    own logits: int8 answers differ from float32 ones.
    """
    probabilities = litert_runtime.softmax(stages.all_exit_logits(splits.validation.images))
    return manifest_thresholds(exporting.served_thresholds(
        probabilities, splits.validation.labels, exit_macs, splits.num_classes,
        confidence_kind=options.confidence, budgets_mflops=options.budget_mflops,
        threshold=options.threshold))


def write(directory: str, model: models.StagedClassifier, mean, std,
          precisions: Sequence[str], representative: Sequence[Dict[str, np.ndarray]],
          metadata: dict) -> dict:
    """Converts a serving-layout model and writes its stage files and manifest.json.

    Args:
        directory: an existing, empty folder.
        metadata: entries the manifest starts from (``exporting.metadata``; at least
            ``num_exits``, ``num_classes`` and ``confidence``).

    Returns:
        The manifest written: ``metadata`` plus the format, the input, the stages' tensor
        names and each precision's files (thresholds come later: ``calibrated_thresholds``).
    """
    graphs, all_exits, up_to_exit = {}, {}, {}
    pixels = representative[0][IMAGES] if representative else None
    for precision in precisions:
        logging.info("converting %d stages to LiteRT (%s)", model.num_exits, precision)
        graphs[precision] = convert(model, mean, std, precision, representative)
        # One stage is its own one-graph file at batch 1.
        batches = ([1] if model.num_exits > 1 else []) + [ACCURACY_BATCH]
        logging.info("converting every exit in one graph (%s, batch %s)", precision,
                     " and ".join(map(str, batches)))
        all_exits[precision] = {batch: convert_all_exits(model, mean, std, precision, batch,
                                                         pixels) for batch in batches}
        # Exits 1..k in one graph, k < K: the time to reach each exit, in one call.
        logging.info("converting exits 1..k in one graph (%s, k < %d)", precision,
                     model.num_exits)
        up_to_exit[precision] = {k: convert_all_exits(model, mean, std, precision, 1, pixels,
                                                      num_exits=k)
                                 for k in range(1, model.num_exits)}
    names = {precision: [{"inputs": graph.inputs, "outputs": graph.outputs} for graph in stages]
             for precision, stages in graphs.items()}
    stage_names = names[precisions[0]]
    if any(stages != stage_names for stages in names.values()):
        raise RuntimeError(f"the precisions' stage signatures differ: {names}")
    manifest = {**metadata, "format": litert_runtime.FORMAT,
                "input": {"name": IMAGES, "shape": [1, *model.image_shape], "dtype": "float32",
                          "values": "raw RGB pixels in 0..255; stage 1 normalises them"},
                "stages": stage_names, "precisions": {}, "tensorflow_version": tf.__version__}
    for precision, stage_graphs in graphs.items():
        os.makedirs(os.path.join(directory, precision))
        files = []
        for k, graph in enumerate(stage_graphs, start=1):
            files.append(f"{precision}/stage{k}.tflite")
            with open(os.path.join(directory, files[-1]), "wb") as f:
                f.write(graph.content)
        entry = manifest["precisions"][precision] = {"files": files, "all_exits": {},
                                                      "up_to_exit": {}}
        named = [("all_exits", str(batch), litert_runtime.all_exits_file(batch), graph)
                 for batch, graph in all_exits[precision].items()]
        named += [("up_to_exit", str(k), litert_runtime.up_to_exit_file(k), graph)
                  for k, graph in up_to_exit[precision].items()]
        for kind, key, name, graph in named:
            path = f"{precision}/{name}"
            with open(os.path.join(directory, path), "wb") as f:
                f.write(graph.content)
            entry[kind][key] = path
    jsonio.write(os.path.join(directory, litert_runtime.MANIFEST), manifest)
    return manifest


def write_model(directory: str, model: models.StagedClassifier, model_config, mean, std,
                training_pixels: np.ndarray, precisions: Sequence[str], metadata: dict) -> dict:
    """Converts a trained model into the files of each precision and writes manifest.json
    (no thresholds yet): what ``ranet.export`` ships and what ``ranet.eval`` measures.

    ``training_pixels``: the int8 conversion's representative images
    (``report_images.representative_pixels``); the same pixels make the same files.
    """
    serving = serving_model(model, model_config)
    representative = (stage_inputs_on(serving, training_pixels, mean, std)
                      if "int8" in precisions else [])
    return write(directory, serving, mean, std, precisions, representative, metadata)


def export(options: exporting.ExportOptions) -> dict:
    """Writes the LiteRT stage files and manifest.json of ``options.model_dir``."""
    restored = exporting.restore(options)
    splits = restored.splits
    exit_macs = [e.macs for e in restored.cost.exits]
    metadata = exporting.metadata(restored, options)
    metadata["operating_point"]["outputs"] = "each precision's own LiteRT logits"

    def write_files(staging: str) -> None:
        manifest = write_model(
            staging, restored.model, restored.config.model, splits.mean, splits.std,
            report_images.representative_pixels(splits.train, options.representative_images),
            options.litert_precision, metadata)
        for precision in options.litert_precision:
            logging.info("calibrating the %s thresholds on %d validation images", precision,
                         len(splits.validation))
            stages = litert_runtime.LiteRTStages(staging, precision,
                                                 num_threads=litert_runtime.AUTO_THREADS)
            manifest["precisions"][precision]["thresholds"] = calibrated_thresholds(
                stages, splits, exit_macs, options)
            # What the export host found fastest, for clients that do not time the files
            # themselves on the serving host (LiteRTStages(num_threads="auto") does).
            manifest["precisions"][precision]["threads_on_export_host"] = {
                "cpu": devices.cpu_name(), "cores": os.cpu_count(),
                "stages": stages.threads}
        jsonio.write(os.path.join(staging, litert_runtime.MANIFEST), manifest)
        return manifest

    return exporting.write_atomically(options, write_files)
