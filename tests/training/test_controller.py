"""The training loop with a time budget, on a fake clock: real steps, simulated seconds.

Each compiled call, evaluation and checkpoint moves the clock by what the test says it costs,
so a run that slows down or speeds up, or whose evaluations dwarf its steps, is simulated
exactly; the budget's arithmetic is tests/training/test_budget.py.
"""

import dataclasses
import json
import logging

import pytest

from helpers import SMOKE, event_scalars
from ranet import config as config_lib
from ranet.training import budget, train_and_evaluate
from ranet.training import controller as controller_lib

TRACING_SECONDS = 3.0  # what the first call costs besides its steps


class FakeClock:
    """Seconds that pass only when the simulated work is done."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(monkeypatch, clock, *, seconds_per_step, evaluation_seconds=0.5,
              save_seconds=0.1):
    """Makes each call, evaluation and checkpoint advance ``clock``; returns the steps at which
    each compiled call ended. ``seconds_per_step(step)``: the cost of that step."""
    train, evaluate, save = (controller_lib.Controller._train,
                             controller_lib.Controller._evaluate, controller_lib.model_dir.save)
    call_ends = []

    def timed_train(self, iterator, num_steps):
        before = self.step
        train(self, iterator, num_steps)
        clock.now += (0 if call_ends else TRACING_SECONDS) + sum(
            seconds_per_step(step) for step in range(before + 1, self.step + 1))
        call_ends.append(self.step)

    def timed_evaluate(self, eval_data):
        clock.now += evaluation_seconds
        return evaluate(self, eval_data)

    def timed_save(manager, step):
        clock.now += save_seconds
        return save(manager, step)

    monkeypatch.setattr(controller_lib.Controller, "_train", timed_train)
    monkeypatch.setattr(controller_lib.Controller, "_evaluate", timed_evaluate)
    monkeypatch.setattr(controller_lib.model_dir, "save", timed_save)
    return call_ends


def _budgeted(model_dir, budget_text, **runtime):
    """The smoke preset on batches of 8 (cheap real steps), 24 steps an epoch as the preset's."""
    runtime = {"log_every_steps": 10, **runtime}
    return dataclasses.replace(
        SMOKE, data=dataclasses.replace(SMOKE.data, synthetic_train_size=256,
                                        validation_size=64),
        optim=dataclasses.replace(SMOKE.optim, train_steps=None, time_budget=budget_text,
                                  schedule="cosine", batch_size=8, reference_batch_size=8),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir), **runtime))


def _plans(caplog) -> list:
    """The last step of every plan the run logged, the first one first."""
    totals = []
    for record in caplog.records:
        message = record.getMessage()
        if "time budget: ~" in message:
            totals.append(int(message.split("~", 1)[1].split(" ", 1)[0]))
        elif "the schedule now ends there" in message:
            totals.append(int(message.split(" steps fit")[0].rsplit(" ", 1)[1]))
    return totals


@pytest.mark.parametrize("change, before, after", [("slowed", 1.0, 2.0), ("sped up", 2.0, 0.5)])
def test_the_plan_follows_the_pace_and_the_run_ends_inside_its_budget(
        tmp_path, caplog, monkeypatch, change, before, after):
    # The machine slows down at step 30 (another job starts), or was slow while the probe
    # timed it and speeds up: the plan gets shorter or longer, and the schedule ends at zero
    # on the new last step.
    caplog.set_level(logging.INFO, logger="absl")
    clock = FakeClock()
    _simulate(monkeypatch, clock, seconds_per_step=lambda step: before if step <= 30 else after)
    result = train_and_evaluate(_budgeted(tmp_path, "100s"), clock=clock)
    plans = _plans(caplog)
    saved = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert f"the run {change} to" in caplog.text
    assert result["step"] == saved["total_steps"] == plans[-1]
    assert plans[-1] < plans[0] if change == "slowed" else plans[-1] > plans[0]
    assert saved["planned_at_step"] < 30  # planned at the pace before the change
    assert clock.now <= 100.0
    rates = event_scalars(tmp_path)["learning_rate"]
    assert max(rates) == result["step"]
    assert rates[max(rates)] == pytest.approx(0.0, abs=1e-7)  # cosine, at its last step


def test_the_probe_runs_the_calls_the_run_runs(tmp_path, monkeypatch):
    # At 0.05 s a step, a 10-step log interval fits the 2 s probe many times: after the
    # traced call and one call timed to size the others, every call ends at a boundary (a log
    # line, a checkpoint, an evaluation every 24 steps, the end), as after the plan.
    clock = FakeClock()
    call_ends = _simulate(monkeypatch, clock, seconds_per_step=lambda step: 0.05)
    train_and_evaluate(_budgeted(tmp_path, "100s", stop_at_step=70), clock=clock)
    assert call_ends[:2] == [1, 2]
    assert all(end % 10 == 0 or end % 24 == 0 for end in call_ends[2:]), call_ends
    assert json.loads((tmp_path / budget.PLAN_FILENAME).read_text())["planned_at_step"] < 70


def test_the_probe_plans_without_waiting_for_a_boundary(tmp_path, monkeypatch):
    # Logs, checkpoints and evaluations far beyond what 20 s hold: the probe plans after its
    # own time, not at the first of them (a run that waited would train to stop_at_step with
    # the schedule's placeholder length).
    clock = FakeClock()
    _simulate(monkeypatch, clock, seconds_per_step=lambda step: 0.4)
    config = _budgeted(tmp_path, "20s", stop_at_step=2000, log_every_steps=10 ** 6,
                       checkpoint_every_steps=10 ** 6, eval_every_epochs=10 ** 4)
    result = train_and_evaluate(config, clock=clock)
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert 0 < plan["planned_at_step"] < plan["total_steps"] < 2000
    assert plan["planned_after_seconds"] < 20 and clock.now <= 20
    assert result["step"] == plan["total_steps"]


def _eta_seconds(message: str) -> int:
    hours, minutes, seconds = map(int, message.rsplit("ETA ", 1)[1].split(":"))
    return hours * 3600 + minutes * 60 + seconds


def test_the_eta_after_the_plan_is_timed_from_the_plan(tmp_path, caplog, monkeypatch):
    # Evaluations (10 s) dwarf the steps (0.5 s); the probe runs two of them, the first one
    # traced, and no other comes before the last step. Timed from the first step, the ETA
    # would count them in the rate of every step to come and overshoot the budget.
    caplog.set_level(logging.INFO, logger="absl")
    clock = FakeClock()
    _simulate(monkeypatch, clock, seconds_per_step=lambda step: 0.5, evaluation_seconds=10.0)
    logged_at = {}
    log = controller_lib.Controller._log

    def log_and_note_the_time(self):
        logged_at[self.step] = clock.now
        return log(self)

    monkeypatch.setattr(controller_lib.Controller, "_log", log_and_note_the_time)
    train_and_evaluate(_budgeted(tmp_path, "60s", eval_every_epochs=10 ** 4), clock=clock)
    planned = [i for i, r in enumerate(caplog.records) if "time budget: ~" in r.getMessage()]
    progress = [r.getMessage() for r in caplog.records[planned[0]:] if "ETA " in r.getMessage()]
    assert len(progress) > 3
    for message in progress:
        step = int(message.split("step ", 1)[1].split("/", 1)[0])
        assert logged_at[step] + _eta_seconds(message) <= 60, (logged_at[step], message)
