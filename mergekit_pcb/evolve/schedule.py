"""F and CR as schedules: anything with `value(generation) -> float`.

A recipe gives a number (a constant) or a mapping `{schedule: NAME, ...}`. A schedule is told
the run's total number of generations (a cosine annealing needs it); a new one is a factory
registered in `SCHEDULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mergekit_pcb.errors import RecipeError


@runtime_checkable
class Schedule(Protocol):
    def value(self, generation: int, generations: int) -> float:
        """The parameter's value in `generation` (0-based) of `generations`."""
        ...


@dataclass(frozen=True)
class Constant:
    constant: float

    def value(self, generation: int, generations: int) -> float:
        return self.constant


def _constant(options: Mapping[str, Any], where: str) -> Schedule:
    unknown = set(options) - {"value"}
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: unknown key for schedule 'constant'")
    if "value" not in options:
        raise RecipeError(f"{where}.value: required by schedule 'constant'")
    return Constant(_number(options["value"], f"{where}.value"))


@dataclass(frozen=True)
class Cosine:
    """Cosine annealing from `high` (t = 0) to `low` (t = T):
    low + ½(high − low)(1 + cos(π t / T)), with T = `period`, or the run's generations when
    no period is given. Past T the cosine goes on (back up to `high` at 2T), as in CADE's
    code (T = 40 over 99 generations)."""

    high: float
    low: float
    period: float | None = None

    def value(self, generation: int, generations: int) -> float:
        T = self.period if self.period is not None else max(generations, 1)
        return self.low + 0.5 * (self.high - self.low) * (1.0 + math.cos(math.pi * generation / T))


def _cosine(options: Mapping[str, Any], where: str) -> Schedule:
    unknown = set(options) - {"max", "min", "period"}
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: unknown key for schedule 'cosine' "
                          "(keys: max, min, period)")
    for key in ("max", "min"):
        if key not in options:
            raise RecipeError(f"{where}.{key}: required by schedule 'cosine'")
    high, low = _number(options["max"], f"{where}.max"), _number(options["min"], f"{where}.min")
    if not (math.isfinite(high) and math.isfinite(low)) or low < 0 or low > high:
        raise RecipeError(f"{where}: schedule 'cosine' needs 0 <= min <= max, got min {low}, "
                          f"max {high}")
    period = options.get("period")
    if period is not None:
        period = _number(period, f"{where}.period")
        if not math.isfinite(period) or period <= 0:
            raise RecipeError(f"{where}.period: must be a positive number, got {period}")
    return Cosine(high, low, period)


SCHEDULES: dict[str, Callable[[Mapping[str, Any], str], Schedule]] = {
    "constant": _constant, "cosine": _cosine}


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: must be a number, got {value!r}")
    return float(value)


def make_schedule(setting: object, where: str, *, low: float = 0.0,
                  high: float | None = None) -> Schedule:
    """A number or `{schedule: name, ...}` -> a Schedule; `where` names the recipe key."""
    if isinstance(setting, Mapping):
        options = dict(setting)
        name = options.pop("schedule", None)
        if name not in SCHEDULES:
            known = ", ".join(sorted(SCHEDULES))
            raise RecipeError(f"{where}.schedule: unknown schedule {name!r} (known: {known})")
        schedule = SCHEDULES[name](options, where)
        if isinstance(schedule, Cosine) and high is not None and schedule.high > high:
            raise RecipeError(f"{where}.max: must be at most {high}, got {schedule.high}")
        return schedule
    value = _number(setting, where)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RecipeError(f"{where}: must be {bound}, got {value}")
    return Constant(value)


__all__ = ["SCHEDULES", "Constant", "Cosine", "Schedule", "make_schedule"]
