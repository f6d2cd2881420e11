"""Equivalent texts of one canonical CIF, for training-set augmentation (``crystallm prepare --augment K``).

A canonical CIF (docs/CIF_FORMAT.md) writes each crystal as exactly one text, so a small training set
is learnt by heart quickly. The same crystal, in the same space group and setting, has many other
correct texts: the crystal's origin may sit at any translation that maps the group's operators onto
themselves (the translations of its Euclidean normalizer), each Wyckoff orbit may be listed by any of
its sites, and sites of one element may come in any order. A variant changes only the atom-site rows;
everything above them (cell, formulas, operators, atom properties) stays the canonical text, so the
tokenizer encodes a variant exactly as it encodes a canonical CIF.

Every variant is checked before it is returned: it re-detects its stated space group, each row's
multiplicity is its orbit size, and its full cell is the canonical full cell moved by one translation
(so it is the same crystal, not just a similar one). Draws are seeded per structure, so a data set is
reproducible whatever the order in which workers take the structures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np

from crystallm_core import spacegroups
from crystallm_core.cif import (
    SITES_HEADER,
    CifError,
    Expanded,
    detect_spacegroup_number,
    expand,
    fmt,
    read_cif,
    sites,
    spacegroup_number,
)

AUGMENT_MAX = 16  # variants per structure: a bound, so that a typo cannot multiply train.bin a thousandfold
DRAWS_PER_VARIANT = 4  # draws allowed per wanted variant: a crystal with few distinct texts gets fewer variants
# Origin shifts are tried on a 1/24 grid: the discrete normalizer translations have components in halves,
# thirds, quarters and eighths, all on it; a free (polar) direction is sampled on it.
SHIFT_GRID = 24
_SNAP = 1e-3  # cif.orbit writes an image within this of 1 as 0, in canonical and variant expansions alike


@dataclass(frozen=True)
class Variants:
    """What augmenting one structure gave: the new texts, and how many drawn texts failed the check."""

    texts: list[str]
    failed: int


@cache
def origin_shifts(sg_number: int) -> np.ndarray:
    """Origin shifts (k, 3) on the 1/24 grid that map the space group's operators onto themselves.

    Moving the origin by ``t`` turns the operator (R, τ) into (R, τ + (I - R) t); the group is unchanged
    exactly when every (I - R) t is a centring translation (lattice vectors included). Row 0 is no shift.
    """
    rots, trans = spacegroups.operations(sg_number)
    centring = trans[np.all(rots == np.eye(3, dtype=int), axis=(1, 2))]
    axis = np.arange(SHIFT_GRID) / SHIFT_GRID
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = np.ones(len(grid), dtype=bool)
    for rot in {r.tobytes(): r for r in rots}.values():  # one test per distinct rotation
        moved = grid @ (np.eye(3) - rot).T
        delta = moved[:, None, :] - centring[None, :, :]
        keep &= (np.abs(delta - np.round(delta)) < 1e-6).all(axis=2).any(axis=1)
    return grid[keep]


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends on the run's seed and the structure's id only."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def _tolerance(decimals: int) -> float:
    """Fractional distance within which two written positions are the same site.

    A written coordinate is off by at most half a unit of its last decimal; an image under an operator
    (rows like x - y) doubles that, and the variant is rounded again: 2.5 units, so 3 units is safe;
    expanding either text may move an image by the snap distance too. At 4 decimals that is 1.3e-3 of
    a cell length, far below any distance between two atoms.
    """
    return 3 * 10.0**-decimals + _SNAP


def same_crystal(a: Expanded, b: Expanded, tol: float) -> bool:
    """Whether ``b``'s atoms are ``a``'s moved by one translation (same cell; ``tol`` is fractional)."""
    if len(a.symbols) != len(b.symbols) or sorted(a.symbols) != sorted(b.symbols):
        return False
    sym_a, sym_b = np.array(a.symbols), np.array(b.symbols)
    rarest = min(set(a.symbols), key=a.symbols.count)
    anchor = a.frac[np.flatnonzero(sym_a == rarest)[0]]
    same_species = sym_a[:, None] == sym_b[None, :]
    for candidate in b.frac[sym_b == rarest]:
        moved = a.frac + (candidate - anchor)
        delta = moved[:, None, :] - b.frac[None, :, :]
        close = (np.abs(delta - np.round(delta)) <= tol).all(axis=2) & same_species
        # Each atom has a partner and no partner is taken twice (distinct sites are far apart).
        if close.any(axis=1).all() and close.any(axis=0).all():
            return True
    return False


def _rows(canonical: str) -> tuple[str, list[tuple[str, int, np.ndarray]], int]:
    """The text above the atom-site rows, and each row's element, multiplicity and position."""
    head, sep, _ = canonical.partition(SITES_HEADER)
    if not sep:
        raise CifError("not a canonical CIF: no atom-site loop")
    block = read_cif(canonical)
    sg = spacegroup_number(block)
    if sg is None:
        raise CifError("not a canonical CIF: no space-group number")
    rows = [(s.symbol, s.multiplicity or 0, np.array(s.frac)) for s in sites(block)]
    return head + SITES_HEADER, rows, sg


def _draw(head: str, rows: list[tuple[str, int, np.ndarray]], sg: int, decimals: int, rng: np.random.Generator) -> str:
    """One text: a random origin shift, a random site of each orbit, rows of each element in random order."""
    rots, trans = spacegroups.operations(sg)
    shifts = origin_shifts(sg)
    shift = shifts[rng.integers(len(shifts))]
    placed = []
    for symbol, mult, frac in rows:
        # Every site of an orbit is the image of the same number of operators, so drawing an operator
        # draws a site uniformly (and no image is snapped, as cif.orbit does near 1).
        op = rng.integers(len(rots))
        chosen = np.mod(rots[op] @ (frac + shift) + trans[op], 1.0)
        placed.append((symbol, mult, tuple(round(float(v), decimals) % 1.0 for v in chosen)))
    # Rows stay grouped by element in the canonical order; only rows of one element trade places.
    order: list[int] = []
    for symbol in dict.fromkeys(s for s, _, _ in placed):
        same = [i for i, (s, _, _) in enumerate(placed) if s == symbol]
        order.extend(same[i] for i in rng.permutation(len(same)))
    lines = []
    for k, i in enumerate(order):
        symbol, mult, xyz = placed[i]
        coords = " ".join(fmt(v, decimals) for v in xyz)
        lines.append(f"{symbol} {symbol}{k} {mult} {coords} 1\n")
    return head + "".join(lines)


def _passes(text: str, sg: int, reference: Expanded, symprec: float, tol: float) -> bool:
    """Same space group detected, multiplicities equal to orbit sizes, same crystal as ``reference``."""
    try:
        block = read_cif(text)
        cell = expand(block)
    except CifError:
        return False
    return (
        cell.counts == [s.multiplicity for s in sites(block)]
        and detect_spacegroup_number(cell, symprec) == sg
        and same_crystal(reference, cell, tol)
    )


def variants(canonical: str, k: int, seed: int, key: str, decimals: int, symprec: float) -> Variants:
    """Up to ``k`` checked texts of the crystal ``canonical`` describes, each different from it and from
    each other; ``seed`` and ``key`` (the structure's id) fix the draws."""
    if not 0 <= k <= AUGMENT_MAX:
        raise ValueError(f"augment must be between 0 and {AUGMENT_MAX}, got {k}")
    if k == 0:
        return Variants([], 0)
    head, rows, sg = _rows(canonical)
    reference = expand(read_cif(canonical))
    tol = _tolerance(decimals)
    rng = _rng(seed, key)
    seen = {canonical}
    texts: list[str] = []
    failed = 0
    for _ in range(k * DRAWS_PER_VARIANT):
        text = _draw(head, rows, sg, decimals, rng)
        if text in seen:
            continue
        seen.add(text)
        if _passes(text, sg, reference, symprec, tol):
            texts.append(text)
            if len(texts) == k:
                break
        else:
            failed += 1
    return Variants(texts, failed)
