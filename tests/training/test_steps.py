"""ranet.training.steps: what one step computes, checked by hand on a tiny batch."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from helpers import TINY_RANET
from ranet import config as config_lib
from ranet.models import get_model, gradient_equilibrium
from ranet.training.optimizer import create_optimizer, learning_rate_schedule
from ranet.training.steps import TrainingSteps, distillation_sums, exit_cross_entropy

BATCH = 8
OPTIM = config_lib.OptimConfig(batch_size=BATCH, reference_batch_size=BATCH, learning_rate=0.1,
                               weight_decay=1e-3, train_steps=10)


def _steps(optim=OPTIM, **kwargs) -> TrainingSteps:
    tf.keras.utils.set_random_seed(0)
    model = get_model(TINY_RANET)
    plan = config_lib.plan_steps(optim, config_lib.RuntimeConfig(), steps_per_epoch=10)
    optimizer = create_optimizer(optim, learning_rate_schedule(optim, plan), "fp32")
    optimizer.build(model.trainable_variables)
    return TrainingSteps(model, optimizer, tf.distribute.get_strategy(), optim, **kwargs)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(BATCH, 32, 32, 3)), tf.float32),
            tf.constant(rng.integers(0, 10, BATCH), tf.int32))


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    logits = tf.constant([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = tf.constant([0, 1])
    log_softmax = tf.nn.log_softmax(logits).numpy()
    targets = np.array([[1, 0, 0], [0, 1, 0]]) * 0.7 + 0.1
    np.testing.assert_allclose(exit_cross_entropy(labels, logits, 0.3),
                               -(targets * log_softmax).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(exit_cross_entropy(labels, logits),
                               -log_softmax[[0, 1], [0, 1]], rtol=1e-6)


@pytest.mark.parametrize("exit_weights", [None, (1.0, 0.5, 2.0)])
def test_one_step_is_sgd_on_the_weighted_sum_of_exit_losses_plus_coupled_l2(exit_weights):
    optim = dataclasses.replace(OPTIM, exit_weights=exit_weights)
    steps = _steps(optim)
    model, images, labels = steps.model, *_batch()
    variables = model.trainable_variables
    weights = exit_weights or (1.0, 1.0, 1.0)
    with tf.GradientTape() as tape:
        exit_losses = [tf.reduce_mean(exit_cross_entropy(labels, logits))
                       for logits in model(images, training=True)]
        l2 = 0.5 * OPTIM.weight_decay * tf.add_n([tf.reduce_sum(v * v) for v in variables])
        loss = tf.add_n([w * e for w, e in zip(weights, exit_losses)]) + l2
    gradients = tape.gradient(loss, variables)
    # First SGD step with momentum: the velocity is -lr * g, so w <- w - lr * g.
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, gradients)]

    steps.repeat_step(images, labels, tf.constant(1))
    for variable, value in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-4, atol=1e-6,
                                   err_msg=variable.path)
    metrics = steps.metrics.result()
    np.testing.assert_allclose([metrics[f"loss/exit_{k}"] for k in (1, 2, 3)], exit_losses,
                               rtol=1e-4)
    assert metrics["loss/total"] == pytest.approx(
        sum(w * float(e) for w, e in zip(weights, exit_losses)), rel=1e-4)


def test_exit_weights_need_one_weight_per_exit():
    with pytest.raises(ValueError, match=r"one weight per exit \(3\).*Received: 2 weights"):
        _steps(dataclasses.replace(OPTIM, exit_weights=(1.0, 2.0)))


def test_run_steps_counts_the_steps_and_stops_at_a_request():
    stop = tf.Variable(0, dtype=tf.int32)
    steps = _steps(stop_request=stop)
    iterator = iter(tf.data.Dataset.from_tensors(_batch()).repeat())
    outcome = steps.run_steps(iterator, tf.constant(3))
    assert int(outcome["steps"]) == 3 and bool(outcome["finite"])
    assert not bool(outcome["stop_requested"]) and int(steps.global_step.numpy()) == 3
    stop.assign(1)
    outcome = steps.run_steps(iterator, tf.constant(5))
    assert int(outcome["steps"]) == 1 and bool(outcome["stop_requested"])
    assert int(steps.global_step.numpy()) == 4


def test_run_steps_ends_at_the_first_non_finite_loss():
    steps = _steps()
    iterator = iter(tf.data.Dataset.from_tensors(_batch()).repeat())
    assert bool(steps.run_steps(iterator, tf.constant(2))["finite"])
    exit_bias = steps.model.stages[0].get_layer("exit1_logits").bias
    exit_bias.assign(exit_bias * np.nan)
    outcome = steps.run_steps(iterator, tf.constant(5))
    assert int(outcome["steps"]) == 1 and not bool(outcome["finite"])
    assert int(steps.global_step.numpy()) == 3


def test_eval_metrics_weight_out_the_padding_rows():
    steps = _steps()
    images, labels = _batch()
    weights = tf.constant([1.0] * 5 + [0.0] * 3)
    metrics = steps.eval_metrics(tf.data.Dataset.from_tensors((images, labels, weights)))
    logits = steps.model(images[:5], training=False)
    assert metrics["examples"] == 5
    for k, exit_logits in enumerate(logits, start=1):
        expected = float(tf.reduce_mean(exit_cross_entropy(labels[:5], exit_logits)))
        assert metrics[f"loss/exit_{k}"] == pytest.approx(expected, rel=1e-5)


def test_exit_distillation_is_the_papers_formula_by_hand():
    rng = np.random.default_rng(1)
    logits = [tf.constant(rng.normal(size=(4, 5)), tf.float32) for _ in range(3)]
    labels = tf.constant([0, 3, 1, 4])
    temperature, weight = 2.0, 0.75

    def log_softmax(values):
        shifted = values - values.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    teacher = np.exp(log_softmax(logits[-1].numpy() / temperature))
    expected = []
    for exit_logits in logits[:-1]:
        cross_entropy = -log_softmax(exit_logits.numpy())[np.arange(4), labels.numpy()]
        kl = (teacher * (np.log(teacher) - log_softmax(exit_logits.numpy() / temperature))).sum(-1)
        expected.append(((1 - weight) * cross_entropy + weight * temperature ** 2 * kl).sum())
    expected.append(-log_softmax(logits[-1].numpy())[np.arange(4), labels.numpy()].sum())
    np.testing.assert_allclose(distillation_sums(labels, logits, temperature, weight), expected,
                               rtol=1e-5)
    # The last exit is a fixed target: no gradient reaches it through the distillation terms.
    with tf.GradientTape() as tape:
        tape.watch(logits)
        terms = distillation_sums(labels, logits, temperature, weight)
    gradient = tape.gradient(terms[0], logits[-1])
    assert gradient is None or not np.any(gradient.numpy())


def test_training_with_exit_distillation_minimises_that_objective():
    optim = dataclasses.replace(OPTIM, exit_distillation=True, distillation_temperature=3.0,
                                distillation_weight=0.9, weight_decay=0.0)
    steps = _steps(optim)
    images, labels = _batch()
    expected = distillation_sums(labels, steps.model(images, training=True), 3.0, 0.9)
    steps.repeat_step(images, labels, tf.constant(1))
    metrics = steps.metrics.result()
    # The step's objective is the distilled one; each exit's metric stays its cross-entropy.
    assert metrics["loss/total"] == pytest.approx(float(tf.reduce_sum(expected)) / BATCH,
                                                  rel=1e-4)
    assert metrics["loss/exit_1"] != pytest.approx(float(expected[0]) / BATCH, rel=1e-3)


def _exit_gradients(equilibrium: bool, exit_index: int, variable_name: str):
    tf.keras.utils.set_random_seed(0)
    with gradient_equilibrium(equilibrium):
        model = get_model(TINY_RANET)
    images, labels = _batch()
    variable = next(v for v in model.trainable_variables if v.path.startswith(variable_name))
    with tf.GradientTape() as tape:
        logits = model(images, training=True)[exit_index]
        loss = tf.reduce_mean(exit_cross_entropy(labels, logits))
    return tape.gradient(loss, variable).numpy()


@pytest.mark.parametrize("exit_index, variable, factor", [
    (0, "flow0_block1_layer0_3x3_conv", 1 / 3),   # before exit 1 of 3: x 1/(3-1+1)
    (0, "exit1_conv1_conv", 1.0),                 # exit 1's own head: after the rescale
    (2, "flow2_block3_layer0_3x3_conv", 1.0),     # before the last exit: x 1/1
])
def test_gradient_equilibrium_rescales_the_trunk_gradients_by_hand(exit_index, variable, factor):
    plain = _exit_gradients(False, exit_index, variable)
    balanced = _exit_gradients(True, exit_index, variable)
    assert np.abs(plain).max() > 0
    np.testing.assert_allclose(balanced, factor * plain, rtol=1e-4, atol=1e-7)
