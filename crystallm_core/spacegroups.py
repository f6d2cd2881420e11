"""The 230 space-group types in the settings spglib standardizes to.

Canonical CIFs are always written in spglib's default setting of their space group
(the first Hall number of each type: unique axis b, origin choice 1, hexagonal axes
for rhombohedral groups). Because of that, the symmetry operators of a canonical CIF
are a pure function of its space-group number, which lets the tokenizer replace the
whole operator loop by one token and lets generated CIFs get their operators back
from the space group the model wrote.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache, lru_cache

import numpy as np
import spglib


@lru_cache(maxsize=1)
def _table() -> tuple[dict[int, tuple[int, str]], dict[str, int]]:
    by_number: dict[int, tuple[int, str]] = {}
    for hall in range(1, 531):
        t = spglib.get_spacegroup_type(hall)
        by_number.setdefault(t.number, (hall, t.international_short))
    by_symbol = {sym: num for num, (_, sym) in by_number.items()}
    return by_number, by_symbol


def symbols() -> list[str]:
    """All 230 short Hermann-Mauguin symbols, in space-group-number order."""
    by_number, _ = _table()
    return [by_number[n][1] for n in range(1, 231)]


def symbol(number: int) -> str:
    return _table()[0][number][1]


def number(symbol: str) -> int | None:
    """Space-group number of a short symbol in the default setting, or None."""
    return _table()[1].get(symbol)


def hall_number(number: int) -> int:
    return _table()[0][number][0]


@cache
def operations(number: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (n, 3, 3) and translations (n, 3) of the default setting."""
    ops = spglib.get_symmetry_from_database(hall_number(number))
    return np.asarray(ops["rotations"], dtype=int), np.asarray(ops["translations"], dtype=float)


def _term(coef: int, axis: str) -> str:
    return {1: f"+{axis}", -1: f"-{axis}"}.get(coef, f"{coef:+d}{axis}")


def _xyz(rot: np.ndarray, trans: np.ndarray) -> str:
    parts = []
    for row, t in zip(rot, trans):
        s = "".join(_term(int(c), a) for c, a in zip(row, "xyz") if c)
        frac = Fraction(float(t) % 1.0).limit_denominator(12)
        if frac:
            s += f"+{frac.numerator}/{frac.denominator}"
        parts.append(s.lstrip("+"))
    return ", ".join(parts)


@cache
def operations_xyz(number: int) -> tuple[str, ...]:
    """Symmetry operators as CIF xyz strings, identity first."""
    rots, trans = operations(number)
    return tuple(_xyz(r, t) for r, t in zip(rots, trans))
