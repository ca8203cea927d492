"""A phase's time budget: how many steps fit in its minutes (`flowie train --minutes`)."""

from __future__ import annotations


class StepBudget:
    """Cuts a phase's step count to what fits its time budget, at the speed measured so far.

    The first ``SETTLE`` steps are not timed (CUDA kernels and allocator warm up there); from then on
    every ``EVERY`` steps the count becomes ``steps done + remaining time / seconds per step``, never
    more than the asked-for ``steps``.
    """

    SETTLE, EVERY = 5, 10

    def __init__(self, seconds: float, started: float, steps: int):
        self.seconds, self.started, self.steps = seconds, started, steps
        self.total = steps
        self._mark: tuple[int, float] | None = None
        self._counted = 0

    def fit(self, done: int, now: float) -> int:
        self._counted += 1
        if self._counted == self.SETTLE:
            self._mark = (done, now)
        elif self._mark is not None and (self._counted - self.SETTLE) % self.EVERY == 0:
            per_step = (now - self._mark[1]) / max(1, done - self._mark[0])
            left = self.seconds - (now - self.started)
            self.total = max(done, min(self.steps, done + int(left / per_step)))
        if now - self.started >= self.seconds:
            self.total = done
        return self.total

