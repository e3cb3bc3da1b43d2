"""Learning-rate schedules that end annealed, on an epoch count or on a time budget.

A schedule is a function of progress p in [0, 1]: p = 0 at its start, 1 where it ends
(cosine: lr = base * (1 + cos(pi p)) / 2 reaches zero; burda: the eight steps of Burda et
al. 2016, lr = base * 10^(-i/7) for the i-th 3^i/3280 of the run). Progress moves linearly in
optimizer steps along a *plan* (p0 at step s0, 1 at step s_end). Without a time budget the plan
is made once: p goes from 0 at step 0 to 1 after the last of --epochs. With --max-minutes the
plan is remade after every epoch from the measured epoch time: from where the run stands, p
reaches 1 after the epochs that still fit in the remaining time, so the learning rate changes
continuously and the run ends annealed when the budget ends. The plan is three numbers in
the checkpoint, so a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import math

# Burda et al. 2016, section 5: "for 3^i epochs with learning rate 0.001 * 10^(-i/7), i = 0..7".
BURDA_STAGES = 8
BURDA_EPOCHS = sum(3**i for i in range(BURDA_STAGES))  # 3280
_BURDA_ENDS = [sum(3**j for j in range(i + 1)) / BURDA_EPOCHS for i in range(BURDA_STAGES)]


def schedule_factor(name: str, progress: float) -> float:
    """The learning rate at `progress` (0..1) as a fraction of the base learning rate."""
    progress = min(max(progress, 0.0), 1.0)
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "burda":
        stage = next((i for i, end in enumerate(_BURDA_ENDS) if progress < end), BURDA_STAGES - 1)
        return 10.0 ** (-stage / 7)
    raise ValueError(f"unknown lr_schedule {name!r}; expected constant, cosine or burda")


class LRSchedule:
    """Sets the optimizer's learning rate before every step from the current plan."""

    def __init__(self, optimizer, name: str, base_lr: float, total_steps: int):
        self.optimizer = optimizer
        self.name = name
        self.base_lr = base_lr
        self.plan(total_steps)

    def plan(self, total_steps: int) -> None:
        """From 0 at step 0 to the end after `total_steps` steps."""
        self.start_progress, self.start_step, self.end_step = 0.0, 0, max(1, total_steps)

    @property
    def annealing(self) -> bool:
        """Whether the schedule has an end that the run should stop at (constant does not)."""
        return self.name != "constant"

    def progress(self, step: int) -> float:
        span = max(1, self.end_step - self.start_step)
        return self.start_progress + (1.0 - self.start_progress) * (step - self.start_step) / span

    def lr(self, step: int) -> float:
        return self.base_lr * schedule_factor(self.name, self.progress(step))

    def apply(self, step: int) -> None:
        """Set the learning rate of the step that follows `step` optimizer steps (a float per group)."""
        if not self.annealing:
            return
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def finished(self, step: int) -> bool:
        return self.annealing and step >= self.end_step

    def replan(self, step: int, remaining_steps: int) -> None:
        """From `step` on, reach the end of the schedule after `remaining_steps` more steps."""
        self.start_progress = min(1.0, self.progress(step))
        self.start_step = step
        self.end_step = step + max(1, remaining_steps)

    def state_dict(self) -> dict:
        return {"name": self.name, "start_progress": self.start_progress, "start_step": self.start_step,
                "end_step": self.end_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint has lr_schedule {state.get('name')!r}, the run {self.name!r}")
        self.start_progress = float(state["start_progress"])
        self.start_step, self.end_step = int(state["start_step"]), int(state["end_step"])


def epochs_that_fit(seconds_left: float, epoch_seconds: list[float]) -> int:
    """How many more epochs fit in `seconds_left`, judged by the recent epochs (their mean).

    The last few epochs, not all: on a shared machine the speed drifts, and the plan
    should follow what the machine does now.
    """
    recent = epoch_seconds[-3:]
    if not recent:
        return 0
    return max(0, int(seconds_left // (sum(recent) / len(recent))))
