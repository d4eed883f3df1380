"""The strategy registry (SPEC §2): the `strategy` axis of the study.

Each strategy is one module, raykd/strategies/<name>.py, whose `STRATEGY`
class describes itself: whether it needs a teacher, what it needs from the
teacher's and the student's forward passes, its options (its constructor's
keyword arguments, read from `strategy_options`), the shape checks a
student/teacher pair must pass, the FLOPs its loss adds, and the loss.
Adding a strategy: write that module and add its name to `STRATEGIES`.

This module imports no torch: the names (and so config validation of a
name, analysis order and colours) are available without it; a strategy's
module is imported the first time something asks about it.
"""
from __future__ import annotations

import importlib
import inspect

# Registration order is the order of tables and plots.
STRATEGIES = ("scratch", "vanilla_kd", "tinybert", "minilm", "distilbert")


def strategy_class(name: str):
    """The class of strategy `name`; ValueError naming the `strategies` field if unknown."""
    if name not in STRATEGIES:
        raise ValueError(f"strategies: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return importlib.import_module(f"raykd.strategies.{name}").STRATEGY


def needs_teacher(name: str) -> bool:
    """Whether strategy `name` calls a teacher (and so needs one trained, loaded and charged)."""
    return strategy_class(name).needs_teacher


def option_defaults(name: str) -> dict:
    """The options strategy `name` reads from `strategy_options`, with their defaults."""
    parameters = inspect.signature(strategy_class(name).__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


def resolve_options(name: str, options: dict) -> dict:
    """Strategy `name`'s options: the values given in `options` over its defaults, coerced to the
    defaults' types (YAML reads "1e-3" as a string); ValueError naming the field if one is not a number."""
    resolved = {}
    for key, default in option_defaults(name).items():
        value = options.get(key, default)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                if isinstance(value, bool):
                    raise TypeError
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"strategy_options.{key}: expected a number, got {value!r}") from None
            if isinstance(default, int) and not number.is_integer():
                raise ValueError(f"strategy_options.{key}: expected an integer, got {value!r}")
            value = int(number) if isinstance(default, int) else number
        resolved[key] = value
    return resolved


def check_options(names: list[str], options: dict) -> None:
    """ValueError naming the field for a key no registered strategy reads (a typo, most likely)."""
    known = sorted({key for name in STRATEGIES for key in option_defaults(name)})
    for key in options:
        if key not in known:
            raise ValueError(f"strategy_options.{key}: unknown option; known: {', '.join(known)}")
    for name in names:
        resolve_options(name, options)


def check_pair(name: str, student, teacher, options: dict) -> None:
    """Raise ValueError "field: message" if this student/teacher pair cannot run strategy `name`.

    `student` and `teacher` are shapes (layers, hidden, heads, intermediate).
    """
    cls = strategy_class(name)
    if cls.needs_teacher and teacher is None:
        raise ValueError(f"teacher: strategy {name!r} needs a teacher")
    cls.check(student, teacher, **resolve_options(name, options))


def build_strategy(name: str, student, teacher, options: dict):
    """The strategy `name` (an `nn.Module`) for this student/teacher pair (already checked by config)."""
    return strategy_class(name)(student, teacher, **resolve_options(name, options))
