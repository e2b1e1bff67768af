"""F and CR as schedules: anything with `value(generation) -> float`.

A recipe gives a number (a constant) or a mapping `{schedule: NAME, ...}`. A schedule is told
the run's total number of generations (a cosine annealing needs it); a new one is a factory
registered in `SCHEDULES`.
"""

from __future__ import annotations

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


SCHEDULES: dict[str, Callable[[Mapping[str, Any], str], Schedule]] = {"constant": _constant}


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
        return SCHEDULES[name](options, where)
    value = _number(setting, where)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RecipeError(f"{where}: must be {bound}, got {value}")
    return Constant(value)


__all__ = ["SCHEDULES", "Constant", "Schedule", "make_schedule"]
