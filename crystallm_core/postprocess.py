"""Clean up generated CIF text before it is checked or stored.

Two edits, each applied only where it can be done safely (the text is returned unchanged
otherwise, and nothing here raises):

* the symmetry-operator loop is replaced by the operators of the stated space group in the
  default setting (:func:`crystallm_core.cif.symops_block`), so the operators always agree with
  the space group the model wrote; the symbol is read first (it is what the tokenizer decodes
  ``<symops>`` from), the number if the symbol is not a known default-setting symbol;
* the atom-properties loop (``_atom_type_*``) is removed: it is there for the model, not for
  readers of the structure;
* ``_cell_volume`` is recomputed from the generated cell parameters (kept to the number of
  decimals the model wrote): like the operators, it is derived data, and a language model's
  arithmetic is only approximately right. The cell parameters themselves are never changed.

Separate from :mod:`crystallm_core.validity` so that samplers need not load the checks.
"""

from __future__ import annotations

import math
import re

from crystallm_core import spacegroups
from crystallm_core.cif import CELL_TAGS, TAG_SG_NUMBER, TAG_SG_SYMBOL, TAG_VOLUME, cell_volume, symops_block

_OPERATOR_TAGS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
_ATOM_TYPE_PREFIX = "_atom_type_"


def postprocess(text: str) -> str:
    """Generated CIF text with standard operators and without the atom-properties loop."""
    if not isinstance(text, str):
        return text
    try:
        lines = _with_volume(text.splitlines(keepends=True))
        number = stated_spacegroup(lines)
        out: list[str] = []
        i = 0
        while i < len(lines):
            end = _loop_end(lines, i) if lines[i].strip() == "loop_" else None
            if end is None:
                out.append(lines[i])
                i += 1
                continue
            headers = [ln.split()[0] for ln in lines[i + 1 : end] if ln.strip().startswith("_")]
            if any(h in _OPERATOR_TAGS for h in headers) and number is not None:
                out.append(symops_block(number))
            elif not any(h.startswith(_ATOM_TYPE_PREFIX) for h in headers):
                out.extend(lines[i:end])
            i = end
        return "".join(out)
    except Exception:
        return text


def stated_spacegroup(lines: list[str]) -> int | None:
    """Space-group number from the symbol tag, else from the number tag; None if neither is usable."""
    values: dict[str, str] = {}
    for line in lines:
        words = line.split(None, 1)
        if len(words) == 2 and words[0] in (TAG_SG_SYMBOL, TAG_SG_NUMBER):
            values.setdefault(words[0], words[1].strip().strip("'\""))
    symbol = values.get(TAG_SG_SYMBOL)
    by_symbol = spacegroups.number(symbol.replace(" ", "")) if symbol else None
    if by_symbol is not None:
        return by_symbol
    raw = values.get(TAG_SG_NUMBER, "")
    if re.fullmatch(r"\d{1,3}", raw) and 1 <= int(raw) <= 230:
        return int(raw)
    return None


def _loop_end(lines: list[str], start: int) -> int:
    """Index just past the loop starting at ``lines[start]`` (its headers and values)."""
    i = start + 1
    while i < len(lines) and lines[i].strip().startswith("_"):
        i += 1
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped == "loop_" or stripped.startswith(("_", "data_")):
            break
        i += 1
    return i


def _with_volume(lines: list[str]) -> list[str]:
    """Lines with the ``_cell_volume`` value recomputed from the cell parameters, where all six parse."""
    cell: dict[str, float] = {}
    volume_at = None
    for k, line in enumerate(lines):
        words = line.split()
        if len(words) == 2 and words[0] in CELL_TAGS:
            try:
                cell[words[0]] = float(words[1])
            except ValueError:
                return lines
        elif len(words) == 2 and words[0] == TAG_VOLUME:
            volume_at = k
    if volume_at is None or len(cell) != 6:
        return lines
    volume = cell_volume(*(cell[t] for t in CELL_TAGS))
    if not math.isfinite(volume):
        return lines  # no volume to give; validity reports the cell
    stated = lines[volume_at].split()[1]
    decimals = len(stated.split(".", 1)[1]) if "." in stated else 0
    out = list(lines)
    out[volume_at] = f"{TAG_VOLUME} {volume:.{decimals}f}\n"
    return out
