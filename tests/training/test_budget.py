"""Time-budgeted training: the plan's arithmetic, the budget's decisions on a fake clock, a
schedule fitted to it, a resume that keeps it, and real runs that end inside their budget.

How the loop follows the budget, on a fake clock, is tests/training/test_controller.py."""

import dataclasses
import functools
import json
import logging
import time

import pytest

from helpers import SMOKE, event_scalars
from ranet import config as config_lib
from ranet.training import budget, train_and_evaluate
from ranet.training.budget import Timings
from ranet.training.controller import format_duration
from ranet.training.optimizer import learning_rate_schedule


def test_steps_that_fit_by_hand():
    # From step 10 at 1 s per step, an evaluation (5 s) every 20 steps and a checkpoint (1 s)
    # every 30, the final ones included. Reaching N costs:
    #   N = 79: 69 + 5 x 4 (20, 40, 60, 79) + 3 (30, 60, 79) = 92 s
    #   N = 80: 70 + 5 x 4 (20, 40, 60, 80) + 3 (30, 60, 80) = 93 s
    #   N = 82: 72 + 5 x 5 (20, 40, 60, 80, 82) + 3 (30, 60, 82) = 100 s
    #   N = 83: 101 s
    assert budget.steps_that_fit(100, 10, 1.0, 5.0, 20, 1.0, 30) == 82
    assert budget.steps_that_fit(93, 10, 1.0, 5.0, 20, 1.0, 30) == 80
    assert budget.steps_that_fit(92.9, 10, 1.0, 5.0, 20, 1.0, 30) == 79
    assert budget.steps_that_fit(5, 10, 1.0, 5.0, 20, 1.0, 30) == 10  # not one step fits


def test_the_plan_keeps_a_reserve_and_refuses_a_budget_too_small():
    plan = budget.plan(1000, elapsed_seconds=100, step=50, seconds_per_step=0.5, eval_seconds=0,
                       eval_every=10 ** 6, save_seconds=0, save_every=10 ** 6,
                       steps_per_epoch=100)
    assert plan.total_steps == 50 + int((1000 * (1 - budget.RESERVE_SHARE) - 100) / 0.5)
    assert plan.epochs == pytest.approx(plan.total_steps / 100)
    with pytest.raises(ValueError, match="leaves no time to train.*Give a longer budget"):
        budget.plan(10, elapsed_seconds=12, step=5, seconds_per_step=0.5, eval_seconds=1,
                    eval_every=10, save_seconds=1, save_every=10, steps_per_epoch=10)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "multistep"])
def test_the_schedule_is_fitted_to_the_planned_steps_and_ends_at_zero(schedule):
    optim = config_lib.OptimConfig(time_budget="1h", schedule=schedule, warmup_epochs=1.0,
                                   learning_rate=0.1, decay_rate=0.1)
    unplanned = config_lib.plan_steps(optim, config_lib.RuntimeConfig(), steps_per_epoch=10)
    rates = learning_rate_schedule(optim, unplanned)
    assert float(rates(5)) == pytest.approx(0.05)     # warm-up, whatever the plan
    assert float(rates(100)) == pytest.approx(0.1)    # before the plan: the peak
    rates.set_plan(config_lib.plan_steps(optim, config_lib.RuntimeConfig(), 10, total_steps=210))
    assert float(rates(10)) == pytest.approx(0.1)
    last = {"cosine": 0.0, "linear": 0.0, "multistep": 0.1 * 0.1 ** 2}[schedule]
    assert float(rates(210)) == pytest.approx(last, abs=1e-7)
    if schedule == "linear":
        assert float(rates(110)) == pytest.approx(0.05)  # half-way from the end of warm-up


def test_durations_show_days():
    assert format_duration(3 * 3600 + 62) == "03:01:02"
    assert format_duration(50 * 3600 + 7) == "2d 02:00:07"


def test_refit_shortens_lengthens_or_keeps_the_plan_by_hand():
    plan = budget.BudgetPlan(budget_seconds=100.0, planned_at_step=10, planned_after_seconds=3.0,
                             seconds_per_step=0.5, eval_seconds=2.0, save_seconds=1.0,
                             total_steps=200, steps_per_epoch=50)
    refit = functools.partial(budget.refit, plan, step=50, schedule="linear")
    # 97 s usable (3% reserve); 50 s gone at 1 step/s: 47 more steps fit, not 150.
    assert refit(planned_steps=200, elapsed_seconds=50, seconds_per_step=1.0) == 97
    # 77 s left at 4 steps/s: the final evaluation and checkpoint (3 s) set aside once more.
    assert refit(planned_steps=100, elapsed_seconds=20, seconds_per_step=0.25) == 50 + 296
    # 101 steps would fit: not more than 2% longer than the plan, which stays.
    assert refit(planned_steps=100, elapsed_seconds=43, seconds_per_step=1.0) == 100
    # A multistep plan grows no further than keeps its passed decay (at 50% of 150) passed.
    assert budget.refit(plan, step=100, planned_steps=150, elapsed_seconds=20,
                        seconds_per_step=0.1, schedule="multistep",
                        decay_fractions=(0.5, 0.75)) == 199


def test_the_plan_file_round_trips_and_a_bad_one_says_how_to_fix_it(tmp_path):
    assert budget.load(str(tmp_path)) is None
    plan = budget.BudgetPlan(budget_seconds=60.0, planned_at_step=20, planned_after_seconds=4.0,
                             seconds_per_step=0.25, eval_seconds=1.5, save_seconds=0.1,
                             total_steps=200, steps_per_epoch=50)
    budget.save(str(tmp_path), plan)
    assert budget.load(str(tmp_path)) == plan and plan.epochs == 4.0
    (tmp_path / budget.PLAN_FILENAME).write_text('{"total_steps": 3}')
    with pytest.raises(ValueError, match="is not a budget plan.*Delete it to plan the budget"):
        budget.load(str(tmp_path))


def _budgeted(model_dir, budget_text, **runtime):
    return dataclasses.replace(
        SMOKE, optim=dataclasses.replace(SMOKE.optim, train_steps=None, time_budget=budget_text,
                                         schedule="cosine"),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir), log_every_steps=20,
                                         **runtime))


@pytest.mark.slow  # real time budgets of 20-45 s
def test_a_budgeted_run_ends_inside_its_budget_and_a_resume_keeps_the_plan(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    first = train_and_evaluate(_budgeted(tmp_path, "20s", stop_at_step=60))
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert first["step"] == 60 < plan["total_steps"]
    assert f"~{plan['total_steps']} steps" in caplog.text
    caplog.clear()
    # Resumed with another budget: the plan, and so the schedule, stay as they were.
    result = train_and_evaluate(_budgeted(tmp_path, "45s"))
    assert result["step"] == plan["total_steps"]
    assert "resuming the plan" in caplog.text and "keeps that plan" in caplog.text
    assert json.loads((tmp_path / budget.PLAN_FILENAME).read_text()) == plan
    rates = event_scalars(tmp_path)["learning_rate"]
    assert rates[max(rates)] == pytest.approx(0.0, abs=1e-7)  # cosine, at its last step


@pytest.mark.slow  # real time budgets of 20-45 s
def test_a_budgeted_run_stops_inside_the_budget(tmp_path):
    started = time.monotonic()
    result = train_and_evaluate(_budgeted(tmp_path, "25s"))
    elapsed = time.monotonic() - started
    plan = json.loads((tmp_path / budget.PLAN_FILENAME).read_text())
    assert result["step"] == plan["total_steps"] > plan["planned_at_step"]
    # The plan fits the budget from what was measured; other tests on the same cores can
    # slow the run after that (the plan only changes at log lines), hence the margin.
    assert plan["planned_after_seconds"] < 25 and elapsed <= 25 * 1.25, elapsed


def test_a_longer_multistep_plan_keeps_the_decays_it_has_passed():
    # At step 100 of 150, decays at 0.5 and 0.75 of the plan: the first (step 75) is passed,
    # and stays so while int(0.5 T) < 100, up to T = 199; the second (112) is ahead.
    assert budget.longest_plan_keeping_decays(100, 150, (0.5, 0.75)) == 199
    assert int(0.5 * 199) < 100 <= int(0.5 * 200)
    # Nothing passed yet (or no decays): any length.
    assert budget.longest_plan_keeping_decays(50, 150, (0.5, 0.75)) > 10 ** 9
    assert budget.longest_plan_keeping_decays(50, 150, ()) > 10 ** 9
    # Both passed: the later fraction binds (ceil(130 / 0.75) - 1 = 173).
    assert budget.longest_plan_keeping_decays(130, 150, (0.5, 0.75)) == 173


def test_a_run_without_a_budget_does_not_speak_of_one(tmp_path, caplog):
    # Its first compiled call runs a whole log interval, so the first line has no rate yet.
    caplog.set_level(logging.INFO, logger="absl")
    train_and_evaluate(dataclasses.replace(SMOKE, runtime=config_lib.RuntimeConfig(
        model_dir=str(tmp_path), log_every_steps=5)))
    lines = [r.getMessage() for r in caplog.records if "ETA " in r.getMessage()]
    assert len(lines) == SMOKE.optim.train_steps // 5
    assert lines[0].endswith("ETA ?") and lines[-1].endswith("ETA 00:00:00")
    assert not any("budget" in line for line in lines), lines



# 100 s, so the probe lasts its minimum (2 s); an evaluation every 50 steps, a save every 25;
# a log line, where the plan may be refit, every step.
STEP_PLAN = config_lib.StepPlan(steps_per_epoch=50, total_steps=config_lib.UNPLANNED_STEPS,
                                warmup_steps=0, decay_steps=(), eval_every_steps=50)
RUNTIME = config_lib.RuntimeConfig(checkpoint_every_steps=25, log_every_steps=1)


def _time_budget(schedule="cosine", agree=None, runtime=RUNTIME, **optim):
    return budget.TimeBudget(
        config_lib.OptimConfig(time_budget="100s", schedule=schedule, **optim), runtime,
        STEP_PLAN, started_at=0.0, evaluates=True, agree=agree)


# The probe's pace with the evaluations and checkpoints it planned for.
STEADY = 2.1 / 13 + 0.2 / 50 + 0.1 / 25


def _probed(time_budget) -> int:
    """Runs the probe of the test below; returns the planned last step (planned at step 14,
    7.3 s into the budget, at 2.1 s / 13 steps)."""
    # The first call traces the step (4 s), and the first evaluation traces it (0.8 s).
    assert time_budget.after(1, 5.0, Timings(1, 4.0, evaluation_seconds=0.8,
                                             save_seconds=0.1)) is None
    assert time_budget.after(2, 5.5, Timings(1, 0.3, evaluation_seconds=0.2)) is None
    assert time_budget.after(8, 6.4, Timings(6, 0.9)) is None
    return time_budget.after(14, 7.3, Timings(6, 0.9))


def test_the_probe_times_the_calls_after_the_traced_one_then_plans():
    time_budget = _time_budget()
    assert time_budget.probe_seconds == 2.0
    # Nothing timed yet: one step, and an evaluation and a checkpoint to time.
    assert time_budget.longest_call() == 1
    assert time_budget.wants_evaluation() and time_budget.wants_save()
    assert time_budget.after(1, 5.0, Timings(1, 4.0, evaluation_seconds=0.8,
                                             save_seconds=0.1)) is None
    # The traced call took 4 s: half a step fits the 2 s probe, so one step; the first
    # evaluation traced it, so another.
    assert time_budget.longest_call() == 1
    assert time_budget.wants_evaluation() and not time_budget.wants_save()
    assert time_budget.after(2, 5.5, Timings(1, 0.3, evaluation_seconds=0.2)) is None
    # 0.3 s a step: calls of up to 6 steps, the probe's 2 s.
    assert time_budget.longest_call() == 6 and not time_budget.wants_evaluation()
    assert time_budget.after(8, 6.4, Timings(6, 0.9)) is None  # 1.4 s into the probe
    assert not time_budget.planned
    total = time_budget.after(14, 7.3, Timings(6, 0.9))  # 2.3 s: the probe is over
    # The traced call and the traced evaluation are left out: 2.1 s over 13 steps, 0.2 s per
    # evaluation, 0.1 s per checkpoint.
    expected = budget.plan(100.0, 7.3, 14, 2.1 / 13, 0.2, 50, 0.1, 25, 50)
    assert total == expected.total_steps == time_budget.plan.total_steps
    assert time_budget.plan == expected
    assert time_budget.longest_call() is None
    assert not time_budget.wants_evaluation() and not time_budget.wants_save()


def test_the_probe_waits_for_its_time_and_for_a_second_evaluation():
    time_budget = _time_budget()
    time_budget.after(1, 5.0, Timings(1, 4.0, evaluation_seconds=0.8, save_seconds=0.1))
    # Past the probe's 2 s, but only the traced evaluation was timed.
    assert time_budget.after(20, 9.0, Timings(19, 3.0)) is None
    assert time_budget.wants_evaluation()
    assert time_budget.after(21, 9.5, Timings(1, 0.2, evaluation_seconds=0.3)) is not None


@pytest.mark.parametrize("seconds_per_step, change", [(0.5, "shorter"), (0.125, "longer"),
                                                      (STEADY, None)])
def test_the_plan_follows_the_pace_since_planning(seconds_per_step, change):
    time_budget = _time_budget()
    planned = _probed(time_budget)
    assert planned > 300
    # Before max(20 steps, an evaluation interval) since planning, the pace is not trusted.
    assert time_budget.after(63, 7.3 + 49 * 5.0, Timings(49, 49 * 5.0)) is None
    now = 7.3 + 50 * seconds_per_step
    total = time_budget.after(64, now, Timings(1, seconds_per_step))
    assert time_budget.steps_per_second == pytest.approx(1 / seconds_per_step)
    if change is None:  # the pace the plan was made for: it holds
        assert total is None and time_budget.plan.total_steps == planned
    elif change == "shorter":  # 97 s usable, 32.3 s gone at 2 steps/s
        assert total == 64 + int((97 - now) / 0.5) == 193
    else:  # the final evaluation and checkpoint (0.3 s) set aside once more
        assert total == 64 + int((97 - now - 0.3) / 0.125) == 729 > planned
    if change:
        assert time_budget.plan.total_steps == total
        assert time_budget.plan.planned_at_step == 14  # the pace is still timed from the plan


def test_the_plan_is_refit_at_log_lines_only():
    time_budget = _time_budget(runtime=dataclasses.replace(RUNTIME, log_every_steps=10))
    planned = _probed(time_budget)
    now = 7.3 + 55 * 0.5  # 55 steps since planning, each three times as slow as planned
    assert time_budget.after(69, now, Timings(55, 27.5)) is None
    assert time_budget.after(71, now + 1.0, Timings(2, 1.0)) is None
    assert time_budget.after(80, now + 5.5, Timings(9, 4.5)) < planned


def test_a_longer_multistep_plan_keeps_the_decay_it_has_passed():
    time_budget = _time_budget(schedule="multistep", decay_fractions=(0.5, 0.75))
    planned = _probed(time_budget)
    step = planned // 2 + 10  # past the first decay
    total = time_budget.after(step, 7.3 + (step - 14) * 0.01, Timings(1, 0.01))
    assert planned < total == budget.longest_plan_keeping_decays(step, planned, (0.5, 0.75))
    assert int(0.5 * total) < step


def test_every_worker_asks_the_chief_at_the_same_points_and_follows_its_answers():
    # Two workers on their own clocks: this one's probe is not over at 5.6 s, the chief's is.
    asked, answers = [], iter([1, 1, 500])  # a call's length, the probe is over, its plan

    def chief(value):
        asked.append(value)
        return next(answers)

    worker = _time_budget(agree=chief)
    worker.after(1, 5.0, Timings(1, 4.0, evaluation_seconds=0.8, save_seconds=0.1))
    worker.longest_call()
    assert worker.after(2, 5.6, Timings(1, 0.3, evaluation_seconds=0.2)) == 500
    assert worker.plan.total_steps == 500 and worker.longest_call() is None
    # Asked for the call's length, whether the probe is over (not here: 0), and the plan (its
    # own, from its own timings, is another).
    assert asked[:2] == [1, 0] and len(asked) == 3 and asked[2] != 500

    # A whole run: the chief on a fast clock, a worker on a slow one that gets the chief's
    # answers; the worker asks at the same points and ends each step where the chief does.
    def run(seconds_per_step, agree):
        time_budget, now, ends = _time_budget(agree=agree), 5.0, []
        time_budget.after(1, now, Timings(1, 4.0, evaluation_seconds=0.8, save_seconds=0.1))
        for step in range(2, 300):
            time_budget.longest_call()
            now += seconds_per_step
            time_budget.after(step, now, Timings(1, seconds_per_step,
                                                 evaluation_seconds=0.2 if step == 2 else None))
            ends.append(time_budget.plan and time_budget.plan.total_steps)
        return ends

    chiefs_answers = []
    chiefs_ends = run(0.1, lambda value: chiefs_answers.append(value) or value)
    answers = iter(chiefs_answers)
    assert run(0.3, lambda value: next(answers)) == chiefs_ends
    assert next(answers, None) is None  # every answer was asked for
    assert len(set(chiefs_ends)) > 2  # planned (not at once), then refit
