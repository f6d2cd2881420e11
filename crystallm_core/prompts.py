"""Prompts: a composition (and optionally a space group) written as the start of a canonical CIF."""

from __future__ import annotations

from pathlib import Path

from pymatgen.core import Composition, Element

from crystallm_core import spacegroups
from crystallm_core.cif import TAG_SG_SYMBOL, cell_formula, compact_formula


class PromptError(ValueError):
    pass


def normalize_composition(text: str) -> str:
    """'Cl2Na2' -> 'Na2Cl2': integer cell counts in the canonical element order."""
    try:
        comp = Composition(text)
    except Exception as e:  # pymatgen raises several types for bad formulas
        raise PromptError(f"composition {text!r}: {e}") from None
    if not comp:
        raise PromptError(f"composition {text!r} has no elements")
    for el, n in comp.items():
        if not isinstance(el, Element):
            raise PromptError(f"composition {text!r}: unknown element {el}")
        if abs(n - round(n)) > 1e-8 or n < 1:
            raise PromptError(f"composition {text!r}: {el} count {n} is not a positive integer (give cell counts)")
    return compact_formula(cell_formula(comp))


def resolve_spacegroup(value: str) -> str:
    """A space-group symbol of the default setting, from a symbol or a number."""
    v = value.strip().replace(" ", "")
    if v.isdigit():
        n = int(v)
        if not 1 <= n <= 230:
            raise PromptError(f"space group number {n} is not in 1..230")
        return spacegroups.symbol(n)
    if spacegroups.number(v) is None:
        raise PromptError(f"unknown space group {value!r}; give a number or a short symbol such as P4/mmm or P6_3/mmc")
    return v


def make_prompt(composition: str, spacegroup: str | None = None) -> str:
    text = f"data_{normalize_composition(composition)}\n"
    if spacegroup:
        text += f"{TAG_SG_SYMBOL} {resolve_spacegroup(spacegroup)}\n"
    return text


def read_prompts(path: str | Path) -> list[tuple[str, str | None]]:
    """Lines of ``COMPOSITION [SPACEGROUP]``; blank lines and ``#`` comments are skipped."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise PromptError(f"{path}:{lineno}: expected 'COMPOSITION [SPACEGROUP]', got {line.strip()!r}")
        try:
            make_prompt(*words)
        except PromptError as e:
            raise PromptError(f"{path}:{lineno}: {e}") from None
        out.append((words[0], words[1] if len(words) == 2 else None))
    if not out:
        raise PromptError(f"{path}: no prompts")
    return out
