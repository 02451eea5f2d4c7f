"""ranet.training.optimizer: the schedules follow the plan, the rate scales with the batch."""

import keras
import numpy as np
import pytest

from ranet import config as config_lib
from ranet.training.optimizer import create_optimizer, learning_rate_schedule


def _plan(optim, steps_per_epoch=10):
    return config_lib.plan_steps(optim, config_lib.RuntimeConfig(), steps_per_epoch)


def test_multistep_drops_tenfold_after_each_decay_step():
    optim = config_lib.OptimConfig(epochs=4, learning_rate=0.1, batch_size=128,
                                   reference_batch_size=64)
    schedule = learning_rate_schedule(optim, _plan(optim))
    rates = {step: float(schedule(step)) for step in (0, 20, 21, 30, 31, 39)}
    # 0.1 scaled to batch 128 is 0.2; decays after steps 20 (50%) and 30 (75%).
    assert rates == pytest.approx({0: 0.2, 20: 0.2, 21: 0.02, 30: 0.02, 31: 0.002, 39: 0.002})


def test_cosine_warms_up_linearly_then_decays_to_zero():
    optim = config_lib.OptimConfig(train_steps=100, schedule="cosine", warmup_epochs=1.0,
                                   learning_rate=0.4)
    schedule = learning_rate_schedule(optim, _plan(optim))
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.2)
    assert float(schedule(10)) == pytest.approx(0.4)
    assert float(schedule(55)) == pytest.approx(0.2, abs=1e-6)  # half-way through the decay
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    rates = [float(schedule(s)) for s in range(10, 101)]
    assert np.all(np.diff(rates) <= 1e-9)


@pytest.mark.parametrize("precision, wrapped", [("fp32", False), ("mixed_bfloat16", False),
                                                 ("mixed_float16", True)])
def test_loss_scaling_only_under_float16(precision, wrapped):
    optim = config_lib.OptimConfig(train_steps=10)
    optimizer = create_optimizer(optim, learning_rate_schedule(optim, _plan(optim)), precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == wrapped
    inner = optimizer.inner_optimizer if wrapped else optimizer
    assert isinstance(inner, keras.optimizers.SGD) and inner.momentum == 0.9
