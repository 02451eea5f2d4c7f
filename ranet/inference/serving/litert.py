"""A trained model as LiteRT files, one per stage, for CPUs and edge devices (TensorFlow side).

``python -m ranet.export --format=litert --model_dir=... --export_dir=...`` writes

    <export_dir>/manifest.json            stages, tensor names, costs, normalisation,
                                          thresholds per precision and how they were chosen
    <export_dir>/fp32/stage<k>.tflite     float32
    <export_dir>/int8/stage<k>.tflite     full-integer post-training quantisation
    <export_dir>/<precision>/all_exits.tflite           every exit in one graph, batch 1
    <export_dir>/<precision>/all_exits_batch<N>.tflite  the same at a static batch of N
    <export_dir>/<precision>/from_stage<s>.tflite       stages s..K in one graph, batch 1
    <export_dir>/<precision>/exits_1_to_<k>.tflite      exits 1..k in one graph, batch 1

Stage k reads the features it needs (stage 1: raw RGB pixels, float32 [1, H, W, 3] in 0..255,
normalised inside) and returns its exit's logits (float32) and the features later stages read
(float32 in fp32; int8 at the producer's scale in int8), with a static batch of 1. Only
builtin ops: no Flex or Select-TF. A baseline is one stage. The all-exits files take the raw
pixels and return every exit's logits (``exit<k>_logits``): where every exit is needed (the
``full`` path, calibration, accuracy over a split) one graph costs less than the stage files
chained, and a batch of N far less again per image. A "from stage s" file takes what stages
s..K read from earlier stages and returns exits s..K: the runtime's route for images that
reach stage s (``litert_runtime.Route``). Exits 1..k in one graph time the network up to
exit k, the cost early exit has to beat. ``litert_runtime`` runs the files with nothing but
``ai-edge-litert`` and numpy.

How the graphs are made: the model is rebuilt in the serving layout (``models.layers``: no
channel slices across stages, pooling as a depthwise convolution, so that int8 runs wholly on
XNNPACK) with the trained weights; the whole network is traced once with ``training=False``,
every exit's logits and every feature that crosses a stage among its outputs, its variables
frozen into constants (batch norm then folds into the convolutions), saved as a SavedModel
signature (which names the tensors) and converted (int8: calibrated once, on training
images). Every batch-1 file is cut out of that one graph (``tflite_graph``), so every file
computes the same numbers on the same tensors; the batch-N file is converted on its own.
"""

import dataclasses
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from ranet import data, host, jsonio, models
from ranet.config import check_choice
from ranet.data import report_images
from ranet.inference import points
from ranet.inference.points import Kind, PointId
from ranet.inference.serving import exporting, litert_runtime, tflite_graph
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


def _features_left_by(model: models.StagedClassifier, k: int) -> List[str]:
    """The features stage k (0-based) outputs that a later stage reads."""
    read_later = set().union(*map(set, model.stage_inputs[k + 1:]))
    return sorted(name for name in model.stages[k].output if name != LOGITS and name in read_later)


def feature_output_name(k: int, name: str) -> str:
    """The source graph's output of feature ``name`` as stage k (0-based) leaves it."""
    return f"stage{k + 1}_{name}"


def _network_function(model: models.StagedClassifier, mean, std, batch_size: int,
                      with_features: bool):
    """Every stage in order on raw pixels [batch_size, H, W, 3], returning every exit's
    logits and, ``with_features``, every feature a later stage reads as the stage that made
    it leaves it: the source graph every batch-1 file is cut from (``tflite_graph``)."""
    def run(inputs):
        features = {IMAGES: data.normalize(inputs[IMAGES], mean, std)}
        outputs = {}
        for k, stage in enumerate(model.stages):
            stage_outputs = stage({name: features[name] for name in model.stage_inputs[k]},
                                  training=False)
            outputs[litert_runtime.exit_logits_name(k)] = stage_outputs[LOGITS]
            for name in _features_left_by(model, k):
                features[name] = stage_outputs[name]
                if with_features:
                    outputs[feature_output_name(k, name)] = stage_outputs[name]
        return outputs

    specs = {IMAGES: tf.TensorSpec([batch_size, *model.image_shape], tf.float32, name=IMAGES)}
    return run, specs


@dataclasses.dataclass(frozen=True)
class CutFiles:
    """Every file of one precision, cut from the source graph (``cut_files``)."""
    stages: List[StageGraph]
    from_stage: Dict[int, StageGraph]  # s (1-based, 2..K-1) -> stages s..K in one file
    up_to_exit: Dict[int, StageGraph]  # k (1-based, 1..K-1) -> exits 1..k in one file
    all_exits: StageGraph              # every exit, batch 1


def _producers(model: models.StagedClassifier) -> List[Dict[str, int]]:
    """For each stage k, where each feature it reads was made: name -> the last stage before
    k that outputs it (the rule the runtime wires buffers by)."""
    made = [set(stage.output) - {LOGITS} for stage in model.stages]
    return [{name: max(j for j in range(k) if name in made[j])
             for name in model.stage_inputs[k] if name != IMAGES}
            for k in range(model.num_exits)]


def cut_files(source: bytes, model: models.StagedClassifier) -> CutFiles:
    """Cuts the stage files, the "from stage s to the end" files and the one-graph files out
    of the source graph of ``_network_function`` (same tensors, same quantisation in each).

    A feature keeps the name stages use for it (``manifest["stages"]``); in an int8 graph it
    stays int8 at the producer's scale. Logits are float32 in every precision."""
    graph = tflite_graph.Graph(source)
    producers = _producers(model)
    num_exits = model.num_exits

    def inputs_from(s: int) -> Dict[str, int]:
        """What stages s.. (0-based) read from before s: the images, or features."""
        if s == 0:
            return {IMAGES: graph.inputs[IMAGES]}
        names = {name: p for k in range(s, num_exits) for name, p in producers[k].items()
                 if p < s}
        return {name: graph.boundary(feature_output_name(p, name))
                for name, p in sorted(names.items())}

    def logits(k: int, name: Optional[str] = None) -> Dict[str, int]:
        exit_name = litert_runtime.exit_logits_name(k)
        return {name or exit_name: graph.outputs[exit_name]}

    def cut(inputs: Dict[str, int], outputs: Dict[str, int]) -> StageGraph:
        return StageGraph(graph.cut(inputs, outputs), inputs=list(inputs), outputs=list(outputs))

    stages = []
    for k in range(num_exits):
        features = {name: graph.boundary(feature_output_name(k, name))
                    for name in _features_left_by(model, k)}
        stages.append(cut({name: graph.boundary(feature_output_name(producers[k][name], name))
                           if name != IMAGES else graph.inputs[IMAGES]
                           for name in model.stage_inputs[k]},
                          {**logits(k, LOGITS), **features}))
    every = {}
    for k in range(num_exits):
        every.update(logits(k))
    return CutFiles(
        stages=stages,
        from_stage={s + 1: cut(inputs_from(s), {name: every[name] for name in
                                                  list(every)[s:]})
                    for s in range(1, num_exits - 1)},
        up_to_exit={k: cut(inputs_from(0), {name: every[name] for name in list(every)[:k]})
                    for k in range(1, num_exits)},
        all_exits=cut(inputs_from(0), every))


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


def convert_source(model: models.StagedClassifier, mean, std, precision: str,
                   pixels: Optional[np.ndarray] = None) -> CutFiles:
    """Converts a serving-layout model once (int8: calibrated on the raw ``pixels``
    [N, H, W, 3]) and cuts every batch-1 file of that precision out of it."""
    check_choice("litert_precision", precision, litert_runtime.PRECISIONS)
    representative = (_representative({IMAGES: np.asarray(pixels, np.float32)})
                      if precision == "int8" else None)
    with tempfile.TemporaryDirectory(prefix="ranet_litert_") as scratch:
        source = _convert(*_network_function(model, mean, std, 1, with_features=True),
                          precision, representative, scratch)
    return cut_files(source.content, model)


def convert_all_exits(model: models.StagedClassifier, mean, std, precision: str,
                      batch_size: int, pixels: Optional[np.ndarray] = None) -> StageGraph:
    """Every exit of a serving-layout model in one graph at a static ``batch_size``; int8 is
    calibrated on the raw ``pixels`` [N, H, W, 3] the source graph was calibrated on (the
    same activations, so the same ranges)."""
    check_choice("litert_precision", precision, litert_runtime.PRECISIONS)
    representative = None
    if precision == "int8":
        pixels = np.asarray(pixels, np.float32)
        # Whole batches, the last one filled up from the first images.
        rows = np.arange(-(-len(pixels) // batch_size) * batch_size) % len(pixels)
        representative = _representative({IMAGES: pixels[rows]}, batch_size)
    with tempfile.TemporaryDirectory(prefix="ranet_litert_") as scratch:
        return _convert(*_network_function(model, mean, std, batch_size, with_features=False),
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
                          exit_macs: Sequence[int], options: exporting.ExportOptions
                          ) -> Tuple[dict, dict]:
    """(thresholds, routes) of one precision for the manifest.

    Thresholds: the default point's, each budget's (and the fixed one's, if asked for),
    calibrated on the whole validation split, as the SavedModel's are, but on these stages'
    own logits: int8 answers differ from float32 ones. Routes: each point's fastest route on
    this host, from where the validation images leave (``routes``).
    """
    probabilities = litert_runtime.softmax(stages.all_exit_logits(splits.validation.images))
    named = manifest_thresholds(exporting.served_thresholds(
        probabilities, splits.validation.labels, exit_macs, splits.num_classes,
        confidence_kind=options.confidence, budgets_mflops=options.budget_mflops,
        threshold=options.threshold))
    return named, routes(stages, probabilities, named)


def routes(stages: litert_runtime.LiteRTStages, probabilities: np.ndarray,
           named: dict) -> dict:
    """The manifest's ``routes`` of one precision: this host's ``RouteTimings`` and, for each
    named set of thresholds, where the images of ``probabilities`` [K, N, C] leave, every
    route's expected milliseconds and the fastest (``switch_stage``)."""
    timings = stages.route_timings()

    def point(thresholds):
        fractions = litert_runtime.exit_fractions(probabilities, thresholds,
                                                  stages.manifest["confidence"])
        first, expected = litert_runtime.choose_route(fractions, timings, stages.routes)
        return {"switch_stage": first, "exit_fractions": fractions,
                "expected_ms": {str(s): ms for s, ms in expected.items()}}

    chosen = {name: point(values) for name, values in named.items() if name != "budgets"}
    chosen["budgets"] = {budget: point(values) for budget, values in named["budgets"].items()}
    return {"timings": timings.to_json(), "points": chosen}


def write(directory: str, model: models.StagedClassifier, mean, std,
          precisions: Sequence[str], pixels: Optional[np.ndarray], metadata: dict) -> dict:
    """Converts a serving-layout model and writes its files and manifest.json.

    Args:
        directory: an existing, empty folder.
        pixels: raw training images [N, H, W, 3] that calibrate int8 (None without int8).
        metadata: entries the manifest starts from (``exporting.metadata``; at least
            ``num_exits``, ``num_classes`` and ``confidence``).

    Returns:
        The manifest written: ``metadata`` plus the format, the input, the stages' tensor
        names and each precision's files (thresholds and routes come later).
    """
    cuts, batched = {}, {}
    for precision in precisions:
        logging.info("converting the network to LiteRT (%s) and cutting its %d stages",
                     precision, model.num_exits)
        cuts[precision] = convert_source(model, mean, std, precision, pixels)
        logging.info("converting every exit in one graph (%s, batch %d)", precision,
                     ACCURACY_BATCH)
        batched[precision] = convert_all_exits(model, mean, std, precision, ACCURACY_BATCH,
                                               pixels)
    stage_names = [{"inputs": graph.inputs, "outputs": graph.outputs}
                   for graph in cuts[precisions[0]].stages]
    manifest = {**metadata, "format": litert_runtime.FORMAT,
                "input": {"name": IMAGES, "shape": [1, *model.image_shape], "dtype": "float32",
                          "values": "raw RGB pixels in 0..255; stage 1 normalises them"},
                "stages": stage_names, "precisions": {}, "tensorflow_version": tf.__version__}
    for precision, cut in cuts.items():
        os.makedirs(os.path.join(directory, precision))
        named = [("files", None, f"stage{k}.tflite", graph)
                 for k, graph in enumerate(cut.stages, start=1)]
        # One stage is its own one-graph file at batch 1.
        if model.num_exits > 1:
            named.append(("all_exits", "1", litert_runtime.all_exits_file(1), cut.all_exits))
        named.append(("all_exits", str(ACCURACY_BATCH),
                      litert_runtime.all_exits_file(ACCURACY_BATCH), batched[precision]))
        named += [("from_stage", str(s), litert_runtime.from_stage_file(s), graph)
                  for s, graph in cut.from_stage.items()]
        named += [("up_to_exit", str(k), litert_runtime.up_to_exit_file(k), graph)
                  for k, graph in cut.up_to_exit.items()]
        entry = manifest["precisions"][precision] = {
            "files": [], "all_exits": {}, "from_stage": {}, "up_to_exit": {},
            # int8: the features that cross stages stay int8 at their producer's scale.
            "feature_dtype": "int8" if precision == "int8" else "float32"}
        for kind, key, name, graph in named:
            path = f"{precision}/{name}"
            with open(os.path.join(directory, path), "wb") as f:
                f.write(graph.content)
            if key is None:
                entry[kind].append(path)
            else:
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
    return write(directory, serving_model(model, model_config), mean, std, precisions,
                 training_pixels if "int8" in precisions else None, metadata)


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
            entry = manifest["precisions"][precision]
            entry["thresholds"], entry["routes"] = calibrated_thresholds(stages, splits,
                                                                         exit_macs, options)
            # What the export host found fastest, for clients that do not time the files
            # themselves on the serving host (LiteRTStages(num_threads="auto") does).
            entry["threads_on_export_host"] = {"cpu": host.cpu_name(), "cores": os.cpu_count(),
                                               "stages": stages.threads}
        jsonio.write(os.path.join(staging, litert_runtime.MANIFEST), manifest)
        return manifest

    return exporting.write_atomically(options, write_files)
