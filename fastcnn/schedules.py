"""Learning-rate schedules, evaluated per optimiser step from the fractional epoch.

A schedule is a pure function ``factor(t)`` of training progress ``t`` in epochs (so a step
schedule and a smooth one are written the same way), scaled by the base LR and optionally
preceded by a linear warm-up. :class:`LRScheduler` applies it to an optimiser; its state is
just the step counter, so resuming is exact.

* ``multistep`` -- ``gamma ** (number of milestones passed)`` (the seeds' step schedules)
* ``cosine``    -- half-cosine from 1 to ``min_lr`` / base over the run
* ``onecycle``  -- Smith's one-cycle (cosine up from base/``div_factor`` to base over
  ``pct_start`` of the run, cosine down to base/(div*final_div)); the torch ``OneCycleLR`` shape
* ``htd``       -- hyperbolic-tangent decay, ``0.5 * (1 - tanh(L + (U - L) t / T))`` with
  L = -6, U = 3 (Hsueh et al., BIGBALLON/HTD)
* ``constant``
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("multistep", "cosine", "onecycle", "htd", "constant")


@dataclass
class ScheduleConfig:
    name: str = "multistep"
    epochs: float = 1.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the base LR
    warmup_epochs: float = 0.0
    warmup_start_ratio: float = 0.0  # warm-up starts at this fraction of the schedule's LR
    pct_start: float = 0.25  # one-cycle
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    htd_lower: float = -6.0
    htd_upper: float = 3.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs <= 0:
            raise ValueError(f"schedule needs epochs > 0, got {self.epochs}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warm-up epochs must be in 0..{self.epochs}, got {self.warmup_epochs}")
        if self.name == "onecycle" and not 0 < self.pct_start < 1:
            raise ValueError(f"one-cycle pct_start must be in (0, 1), got {self.pct_start}")
        self.milestones = tuple(sorted(float(m) for m in self.milestones))


def _cos(a: float, b: float, frac: float) -> float:
    """Cosine interpolation from a (frac=0) to b (frac=1)."""
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def lr_factor(cfg: ScheduleConfig, t: float) -> float:
    """Multiplier of the base LR at fractional epoch ``t`` (0 <= t <= epochs)."""
    T = cfg.epochs
    if cfg.name == "multistep":
        f = cfg.gamma ** sum(1 for m in cfg.milestones if t >= m)
    elif cfg.name == "cosine":
        f = _cos(1.0, cfg.min_lr_ratio, t / T)
    elif cfg.name == "onecycle":
        up = cfg.pct_start * T
        start = 1.0 / cfg.div_factor
        if t < up:
            f = _cos(start, 1.0, t / up)
        else:
            f = _cos(1.0, start / cfg.final_div_factor, (t - up) / (T - up))
    elif cfg.name == "htd":
        f = 0.5 * (1.0 - math.tanh(cfg.htd_lower + (cfg.htd_upper - cfg.htd_lower) * t / T))
    else:
        f = 1.0
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        frac = t / cfg.warmup_epochs
        f *= cfg.warmup_start_ratio + (1.0 - cfg.warmup_start_ratio) * frac
    return f


@dataclass
class LRScheduler:
    """Sets each param group's ``lr = initial_lr * lr_factor(t)`` with ``t = step / steps_per_epoch``."""

    optimizer: object
    cfg: ScheduleConfig
    steps_per_epoch: int
    step_count: int = 0
    base_lrs: list = field(default_factory=list)

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training set smaller than one batch?)")
        if not self.base_lrs:
            self.base_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self._apply()

    @property
    def epoch_progress(self) -> float:
        return self.step_count / self.steps_per_epoch

    def _apply(self) -> None:
        f = lr_factor(self.cfg, self.epoch_progress)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs),
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(f"checkpoint was taken with {state['steps_per_epoch']} steps per epoch, "
                             f"this run has {self.steps_per_epoch} (batch size, subset or world size changed)")
        self.step_count = int(state["step_count"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
