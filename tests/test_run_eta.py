"""The ETA line a run prints early in training (distillkit.training.progress.RunEta)."""

from distillkit.training.progress import RunEta


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(eta: RunEta, clock: Clock, seconds_per_step: list[float]) -> None:
    for step, seconds in enumerate(seconds_per_step, start=eta.start + 1):
        clock.now += seconds
        eta.update(step)


def test_evaluation_is_estimated_per_sample_call_whatever_the_batches():
    # 0.9 s per step of 9 calls on 100 samples is 1 ms per call on one sample; the evaluation's
    # 1000 samples x (NFE 1+2+4+8 = 15 + a 16-step rk4 reference = 64) calls take 79 s.
    lines, clock = [], Clock()
    eta = RunEta(0, 1000, step_calls=9, batch_size=100, eval_sample_calls=1000 * 79, enabled=True,
                 log=lines.append, clock=clock)
    drive(eta, clock, [5.0] + [0.9] * 20)
    assert len(lines) == 1, lines
    assert "(900 ms/step)" in lines[0] and "evaluation ~1m19s" in lines[0], lines
    # the line came at the 10th measured step (9 s >= 3 s); the 989 steps left at 0.9 s: 14m50s
    assert "training ~14m50s" in lines[0], lines


def test_a_fast_start_waits_for_three_seconds_of_steps_before_it_estimates():
    # Ten 10 ms steps, then a slow stretch: the estimate covers both, not the first 0.1 s only.
    lines, clock = [], Clock()
    eta = RunEta(0, 10_000, step_calls=1, batch_size=1, eval_sample_calls=0, enabled=True,
                 log=lines.append, clock=clock)
    drive(eta, clock, [1.0] + [0.01] * 10)
    assert lines == []
    drive_from = 12
    for step in range(drive_from, drive_from + 29):
        clock.now += 0.1
        eta.update(step)
    # measured: 10 x 0.01 + 29 x 0.1 = 3.0 s over 39 steps
    assert len(lines) == 1 and f"({3.0 / 39 * 1000:.0f} ms/step)" in lines[0], lines


def test_a_short_run_reports_at_its_last_step_and_a_resumed_one_counts_from_its_start():
    lines, clock = [], Clock()
    eta = RunEta(100, 105, step_calls=1, batch_size=1, eval_sample_calls=0, enabled=True, log=lines.append, clock=clock)
    drive(eta, clock, [1.0, 0.2, 0.2, 0.2, 0.2])
    assert len(lines) == 1 and "(200 ms/step)" in lines[0] and "training ~0s" in lines[0], lines
