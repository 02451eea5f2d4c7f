"""ranet.models.layers: the fused batch norm trains and infers like Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ranet.models.layers import FusedBatchNormalization


def _keras_and_fused_batch_norm(x, **kwargs):
    """A Keras BatchNormalization and a FusedBatchNormalization with the same weights."""
    layers_ = (keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs),
               FusedBatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs))
    rng = np.random.default_rng(1)
    weights = [rng.uniform(0.5, 1.5, x.shape[-1]).astype("float32") for _ in range(4)]
    for layer in layers_:
        layer.build(x.shape)
        layer.set_weights(weights)
    return layers_, weights


def _bn_inputs(shape=(4, 5, 5, 3)):
    return tf.constant(np.random.default_rng(0).normal(2.0, 3.0, shape), tf.float32)


def test_fused_batch_norm_trains_like_keras_and_keeps_the_unbiased_running_variance():
    x = _bn_inputs()
    layers_, (_, _, start_mean, start_variance) = _keras_and_fused_batch_norm(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        outputs = [layer(x, training=True) for layer in layers_]
        losses = [tf.reduce_sum(y * y * tf.range(1.0, 4.0)) for y in outputs]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    keras_grads, fused_grads = [tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
                                for layer, loss in zip(layers_, losses)]
    for keras_grad, fused_grad in zip(keras_grads, fused_grads):
        np.testing.assert_allclose(keras_grad, fused_grad, rtol=1e-4, atol=1e-4)

    # By hand: moving = 0.9 * moving + 0.1 * batch statistic, the variance with Bessel's
    # correction (n = 4 * 5 * 5 values per channel), as PyTorch's BatchNorm2d keeps it.
    values = x.numpy().reshape(-1, 3)
    fused = layers_[1]
    np.testing.assert_allclose(fused.moving_mean, 0.9 * start_mean + 0.1 * values.mean(0),
                               rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance,
                               0.9 * start_variance + 0.1 * values.var(0, ddof=1), rtol=1e-5)


def test_fused_batch_norm_at_inference_uses_the_moving_statistics_like_keras():
    x = _bn_inputs()
    layers_, _ = _keras_and_fused_batch_norm(x)
    keras_out, fused_out = [layer(x, training=False) for layer in layers_]
    np.testing.assert_allclose(keras_out, fused_out, atol=1e-5)
    np.testing.assert_array_equal(layers_[0].moving_mean, layers_[1].moving_mean)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fused_batch_norm_keeps_float32_statistics_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)  # the autouse fixture restores it
    layer = FusedBatchNormalization(momentum=0.9)
    x = tf.cast(_bn_inputs(), layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    x_grad, gamma_grad = tape.gradient(loss, [x, layer.gamma.value])
    assert y.dtype == x.dtype == x_grad.dtype
    assert layer.moving_mean.dtype == gamma_grad.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean, 0.1 * _bn_inputs().numpy().reshape(-1, 3).mean(0),
                               rtol=2e-2)


def test_synchronized_fused_batch_norm_takes_the_keras_path():
    x = _bn_inputs()
    (keras_layer, fused), _ = _keras_and_fused_batch_norm(x, synchronized=True)
    assert not fused._fusable(x, None)
    np.testing.assert_allclose(keras_layer(x, training=True), fused(x, training=True), atol=1e-6)
    np.testing.assert_allclose(keras_layer.moving_variance, fused.moving_variance, rtol=1e-6)
