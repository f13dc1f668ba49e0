"""Each config key's help and range, declared with its field (`key`), and the range check run once
when a config is loaded.

Types are checked while the recipe is read (config.py); this is the second half of "validated at
the edge": a zero where a count belongs or a negative learning rate stops the run before any
work, with the key named, instead of surfacing later as a traceback (`log_every=0` was a division
by zero) or as a run that silently learns nothing (`grad_clip=0` scales every gradient to zero).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from .errors import UserError

# (low, high, low_open, high_open): None = unbounded; *_open excludes that end.
COUNT = (1, None, False, False)          # a size or count: 1 or more
NON_NEGATIVE = (0, None, False, False)
POSITIVE = (0, None, True, False)
UNIT = (0, 1, False, False)              # a fraction or probability in [0, 1]
OPEN_UNIT_RIGHT_CLOSED = (0, 1, True, False)
OPEN_UNIT = (0, 1, True, True)
UNIT_OPEN_RIGHT = (0, 1, False, True)
SEED = (0, 2 ** 32 - 1, False, False)     # what numpy's generator accepts


def key(default: Any = dataclasses.MISSING, help: str = "", range: tuple | None = None, *,
        factory: Callable[[], Any] | None = None) -> Any:
    """A config field: its default (or `factory`), a one-line `help` and, for a number, its `range`
    (one of the tuples above; None = any finite number). `config show` and docs/config.md print
    both; `check_ranges` enforces the range."""
    metadata = {"help": help, "range": range}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_ranges(cfg: Any, src: str) -> None:
    """Raise `UserError` naming the first key whose value is out of its range (None = unset, allowed)."""
    for name, value, rule in _numbers(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            raise UserError(f"{src}: config key '{name}' must be a finite number, got {value!r}")
        if rule is None or value is None:
            continue
        low, high, low_open, high_open = rule
        if ((low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise UserError(f"{src}: config key '{name}' must be {describe(rule)}, got {value!r}")
    m = cfg.model
    if m.base is None and (m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads):
        raise UserError(f"{src}: config keys 'model.hidden_size' ({m.hidden_size}), 'model.num_heads' "
                        f"({m.num_heads}) and 'model.num_kv_heads' ({m.num_kv_heads}): the heads must divide "
                        f"the hidden size and the key-value heads the heads")


def _numbers(obj: Any, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            yield prefix + f.name, value, f.metadata.get("range")


def describe(rule: tuple) -> str:
    """A range as the error message and the docs write it: '>= 1', 'in (0, 1]'."""
    low, high, low_open, high_open = rule
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
