"""Deterministic, resumable tf.data input functions for ``strategy.distribute_datasets_from_function``.

Every global batch is a fixed function of (seed, step), and each input pipeline reads its own
contiguous slice of it, so training is reproducible, resumable at any step, and independent of
how many pipelines or replicas share the work.
"""

from typing import Callable

import numpy as np
import tensorflow as tf

from ranet.data.splits import DataError, Split, normalize

# Independent random streams derived from one user seed (synthetic data uses stream 0).
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
# Pinned rather than "auto_select" so that every host and device kind draws the same numbers.
_RNG_ALG = "philox"


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder is dropped, so it must be at least one."""
    if global_batch_size <= 0 or global_batch_size > num_examples:
        raise DataError(f"global_batch_size must be in [1, {num_examples}] (the number of "
                        f"training examples). Pass a smaller --batch_size or use more data. "
                        f"Received: global_batch_size={global_batch_size}")
    return num_examples // global_batch_size


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Global batches for one evaluation pass; the last one is padded."""
    if global_batch_size <= 0:
        raise DataError(f"global_batch_size must be positive. "
                        f"Received: global_batch_size={global_batch_size}")
    return -(-num_examples // global_batch_size)


def slice_sizes(ctx: tf.distribute.InputContext, global_batch_size: int) -> tuple:
    """(rows per pipeline per global batch, rows per replica batch), after checking they divide."""
    replicas, pipelines = ctx.num_replicas_in_sync, ctx.num_input_pipelines
    if global_batch_size % replicas or replicas % pipelines:
        raise DataError(f"global_batch_size must be divisible by the {replicas} replicas in "
                        f"sync, and the replicas by the {pipelines} input pipelines. Pass a "
                        f"--batch_size that is a multiple of {replicas}. "
                        f"Received: global_batch_size={global_batch_size}")
    return global_batch_size // pipelines, ctx.get_per_replica_batch_size(global_batch_size)


def _stream_seed(seed: int, stream: int, epoch) -> tf.Tensor:
    """A stateless seed for one (seed, stream, epoch)."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64), alg=_RNG_ALG)


def _crop_and_flip(images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor,
                   padding: int) -> tf.Tensor:
    """Zero-pads by ``padding``, takes the window of the original size at ``offsets`` (B, 2),
    mirrors rows where flips."""
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    size = images.shape[1]
    span = tf.range(size)
    ys = offsets[:, :1] + span
    # Reading the window's columns right to left is the flip, in the same gather.
    xs = offsets[:, 1:] + tf.where(flips[:, None] > 0, size - 1 - span, span)
    rows = tf.gather(padded, ys, axis=1, batch_dims=1)
    return tf.gather(rows, xs, axis=2, batch_dims=1)


def _pipeline_rows(global_rows: tf.Tensor, ctx, rows_per_pipeline: int,
                   per_replica: int) -> tf.Tensor:
    """(steps, G) global batches -> (steps * k, B) replica batches of this pipeline's slice."""
    start = ctx.input_pipeline_id * rows_per_pipeline
    mine = global_rows[:, start:start + rows_per_pipeline]
    return tf.reshape(mine, [-1, per_replica])


def train_input_fn(split: Split, *, global_batch_size: int, mean, std, seed: int,
                   augment: bool = True, crop_padding: int = 4,
                   start_step: int = 0) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """An infinite, shuffled, resumable training pipeline: yields (images f32, labels i32).

    Global step s is batch s % steps_per_epoch of epoch s // steps_per_epoch; epoch e reads the
    rows of a permutation drawn from (seed, e), and augmentation of a row is drawn from
    (seed, e, row), so a step's pixels do not depend on the number of pipelines. Augmentation
    is a random crop of the image zero-padded by ``crop_padding`` and a horizontal flip.
    """
    num_examples = len(split)
    steps = steps_per_epoch(num_examples, global_batch_size)
    if start_step < 0:
        raise DataError(f"start_step must be >= 0. Received: start_step={start_step}")
    start_epoch, start_offset = divmod(start_step, steps)

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        rows_per_pipeline, per_replica = slice_sizes(ctx, global_batch_size)
        batches_per_step = rows_per_pipeline // per_replica
        images, labels = tf.constant(split.images), tf.constant(split.labels)

        def epoch_plan(epoch):
            """This pipeline's replica batches of one epoch: row ids and augmentation draws."""
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples), _stream_seed(seed, _SHUFFLE_STREAM, epoch), alg=_RNG_ALG)
            global_rows = tf.reshape(order[:steps * global_batch_size], [steps, global_batch_size])
            rows = _pipeline_rows(global_rows, ctx, rows_per_pipeline, per_replica)
            first = tf.where(epoch == start_epoch, start_offset, 0) * batches_per_step
            plan = {"rows": rows[first:]}
            if augment:
                # One draw per row of the whole split, so a row's draw is fixed by (seed, epoch).
                offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
                    _stream_seed(seed, _AUGMENT_STREAM, epoch), 2, alg=_RNG_ALG))
                offsets = tf.random.stateless_uniform([num_examples, 2], offset_seed, 0,
                                                      2 * crop_padding + 1, tf.int32, alg=_RNG_ALG)
                flips = tf.random.stateless_uniform([num_examples], flip_seed, 0, 2, tf.int32,
                                                    alg=_RNG_ALG)
                plan["offsets"] = tf.gather(offsets, plan["rows"])
                plan["flips"] = tf.gather(flips, plan["rows"])
            return tf.data.Dataset.from_tensor_slices(plan)

        def make_batch(plan):
            batch = tf.gather(images, plan["rows"])
            if augment:
                batch = _crop_and_flip(batch, plan["offsets"], plan["flips"], crop_padding)
            return normalize(batch, mean, std), tf.gather(labels, plan["rows"])

        dataset = tf.data.Dataset.counter(start_epoch).flat_map(epoch_plan)
        dataset = dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return input_fn


def eval_input_fn(split: Split, *, global_batch_size: int, mean,
                  std) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """One in-order pass, padded to whole global batches: yields (images, labels, weights).

    Padding rows repeat row 0 with weight 0, so weighted metrics count every example once.
    """
    num_examples = len(split)
    if num_examples == 0:
        raise DataError("The split to evaluate is empty. Evaluate another split, or set "
                        "--validation_size > 0 to evaluate on validation. Received: 0 examples")
    steps = num_eval_steps(num_examples, global_batch_size)
    padded = np.arange(steps * global_batch_size)
    weights = (padded < num_examples).astype(np.float32)
    padded[num_examples:] = 0

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        rows_per_pipeline, per_replica = slice_sizes(ctx, global_batch_size)
        images, labels = tf.constant(split.images), tf.constant(split.labels)
        plan = {name: _pipeline_rows(tf.reshape(values, [steps, global_batch_size]), ctx,
                                     rows_per_pipeline, per_replica)
                for name, values in (("rows", padded), ("weights", weights))}

        def make_batch(plan):
            return (normalize(tf.gather(images, plan["rows"]), mean, std),
                    tf.gather(labels, plan["rows"]), plan["weights"])

        dataset = tf.data.Dataset.from_tensor_slices(plan)
        dataset = dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return input_fn
