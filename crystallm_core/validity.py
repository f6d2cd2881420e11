"""Is a CIF a physically sensible, self-consistent crystal?

:func:`check` runs a cheap pre-check (parseable, sane cell, sites, operators) and then four
consistency checks on the expanded structure: formula, site multiplicities, bond lengths and
space group. It never raises: anything that goes wrong becomes an invalid verdict with a reason.
Each reason is ``"code: detail"`` with a stable code (the ``R_*`` constants) so that failures
can be counted per cause. Thresholds and their physical justification: docs/VALIDITY.md.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import numpy as np
import spglib
from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
from pymatgen.core import Composition, Element, Lattice, Structure

from crystallm_core import spacegroups
from crystallm_core.cif import (
    DEFAULT_SYMPREC,
    TAG_FORMULA_STRUCTURAL,
    TAG_FORMULA_SUM,
    TAG_SG_NUMBER,
    TAG_SG_SYMBOL,
    TAG_VOLUME,
    TAG_Z,
    CifBlock,
    CifError,
    Site,
    cell_formula,
    cell_parameters,
    compact_formula,
    number,
    orbit,
    read_cif,
    sites,
    symmetry_operations,
)

# Reason codes (stable: reports count failures by them).
R_UNPARSEABLE = "unparseable"  # not a CIF data block
R_CELL = "cell"  # cell parameters missing, out of bounds, or disagreeing with the stated volume
R_NO_SITES = "no_sites"  # no atom-site loop or an empty one
R_SITES = "sites"  # unknown element, bad coordinate or partial occupancy
R_SYMOPS = "symops"  # symmetry operators malformed, singular or too many
R_SIZE = "size"  # expansion would exceed MAX_IMAGES positions
R_FORMULA = "formula"
R_MULTIPLICITY = "multiplicity"
R_OVERLAP = "overlap"  # two atoms closer than OVERLAP_DISTANCE
R_BONDS = "bonds"  # bond score below BOND_SCORE_THRESHOLD
R_SPACEGROUP = "spacegroup"
R_INTERNAL = "internal"  # an unexpected error inside a check (a bug, or input no check foresaw)
REASON_CODES = (
    R_UNPARSEABLE,
    R_CELL,
    R_NO_SITES,
    R_SITES,
    R_SYMOPS,
    R_SIZE,
    R_FORMULA,
    R_MULTIPLICITY,
    R_OVERLAP,
    R_BONDS,
    R_SPACEGROUP,
    R_INTERNAL,
)

# Sensible pre-check bounds (docs/VALIDITY.md explains each).
MIN_LENGTH, MAX_LENGTH = 0.5, 100.0  # Å, cell lengths (exclusive)
MIN_ANGLE, MAX_ANGLE = 10.0, 170.0  # degrees, cell angles (exclusive)
MIN_VOLUME = 1.0  # Å^3
VOLUME_RTOL = 0.01  # stated _cell_volume vs the volume of the cell parameters
MAX_ABS_COORD = 10.0  # fractional coordinates beyond this are garbage, not a position
OCCUPANCY_TOL = 1e-3  # partial occupancy (disorder) is not a single crystal structure
MAX_OPERATORS = 192  # the most any space group has in a conventional cell (Fm-3m)
MAX_IMAGES = 5_000  # sites x operators: bounds the cost of expanding a (generated) CIF


# Bond-length reasonableness.
IONIC_DELTA_X = 1.7  # Pauling electronegativity difference above which a bond is taken as ionic
SHORT_FACTOR = 0.6  # nearest neighbour closer than this fraction of the expected bond: too short
LONG_FACTOR = 2.0  # no neighbour within this multiple of the expected bond: isolated atom
OVERLAP_DISTANCE = 0.5  # Å: two atoms this close are one atom written twice
BOND_SCORE_THRESHOLD = 1.0  # fraction of atoms with a reasonable nearest neighbour

_XYZ, _XYZ_NEW = "_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz"
_FORMULA_NAME = re.compile(r"(?:[A-Z][a-z]?\d*)+")
_EXPLICIT_COUNTS = re.compile(r"(?:[A-Z][a-z]?\d+)+")


class _Fail(Exception):
    """Ends the pre-check with one reason."""

    def __init__(self, code: str, detail: str) -> None:
        self.reason = f"{code}: {detail}"
        super().__init__(self.reason)


@dataclass
class Validity:
    """The verdict on one CIF; a check that did not run (pre-check failed) counts as failed."""

    sensible: bool = False
    formula_ok: bool = False
    multiplicity_ok: bool = False
    spacegroup_ok: bool = False
    bond_score: float | None = None
    bonds_ok: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def is_valid(self) -> bool:
        return self.sensible and self.formula_ok and self.multiplicity_ok and self.spacegroup_ok and self.bonds_ok

    @property
    def codes(self) -> list[str]:
        """Distinct reason codes, in the order the checks found them."""
        return list(dict.fromkeys(reason_code(r) for r in self.reasons))

    def to_dict(self) -> dict[str, Any]:
        return {
            "is_valid": self.is_valid,
            "sensible": self.sensible,
            "formula_ok": self.formula_ok,
            "multiplicity_ok": self.multiplicity_ok,
            "spacegroup_ok": self.spacegroup_ok,
            "bonds_ok": self.bonds_ok,
            "bond_score": self.bond_score,
            "reasons": list(self.reasons),
        }


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


@dataclass
class _Parsed:
    block: CifBlock
    lattice: Lattice
    sites: list[Site]
    rotations: np.ndarray
    translations: np.ndarray


def check(text: str) -> Validity:
    """Judge one CIF text. Never raises."""
    v = Validity()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy/pymatgen warnings on garbage input are not verdicts
            _check(text, v)
    except Exception as exc:
        v.reasons.append(f"{R_INTERNAL}: {type(exc).__name__}: {str(exc)[:200]}")
    return v


def _check(text: str, v: Validity) -> None:
    try:
        parsed = _precheck(text)
    except _Fail as fail:
        v.reasons.append(fail.reason)
        return
    structure, counts = _expand(parsed)
    v.sensible = True
    cell = _Contents.of(structure)
    v.formula_ok = _record(v, R_FORMULA, _formula_problems(parsed.block, cell))
    v.multiplicity_ok = _record(v, R_MULTIPLICITY, _multiplicity_problems(parsed, counts))
    v.bond_score, bond_problems = _bond_check(structure)
    v.bonds_ok = _record(v, None, bond_problems)
    v.spacegroup_ok = _record(v, R_SPACEGROUP, _spacegroup_problems(parsed, structure))


def _record(v: Validity, code: str | None, problems: list[str]) -> bool:
    """Append problems as reasons (prefixed with ``code`` unless they carry their own); True if none."""
    v.reasons.extend(p if code is None else f"{code}: {p}" for p in problems)
    return not problems


# ---------------------------------------------------------------- sensible pre-check


def _precheck(text: str) -> _Parsed:
    """Parse and bound everything cheap to check; raises _Fail with the first problem."""
    try:
        block = read_cif(text)
    except CifError as exc:
        raise _Fail(R_UNPARSEABLE, str(exc)) from None
    lattice = _lattice(block)
    site_list = _sites(block)
    rots, trans = _operators(block)
    images = len(site_list) * len(rots)
    if images > MAX_IMAGES:
        raise _Fail(R_SIZE, f"{len(site_list)} sites x {len(rots)} operators exceed {MAX_IMAGES} positions")
    return _Parsed(block, lattice, site_list, rots, trans)


def _lattice(block: CifBlock) -> Lattice:
    try:
        a, b, c, al, be, ga = cell_parameters(block)
    except CifError as exc:
        raise _Fail(R_CELL, str(exc)) from None
    for name, x in zip("abc", (a, b, c), strict=True):
        if not MIN_LENGTH < x < MAX_LENGTH:
            raise _Fail(R_CELL, f"length {name}={x:g} Å outside ({MIN_LENGTH:g}, {MAX_LENGTH:g})")
    for name, x in zip(("alpha", "beta", "gamma"), (al, be, ga), strict=True):
        if not MIN_ANGLE < x < MAX_ANGLE:
            raise _Fail(R_CELL, f"angle {name}={x:g}° outside ({MIN_ANGLE:g}, {MAX_ANGLE:g})")
    ca, cb, cg = (math.cos(math.radians(x)) for x in (al, be, ga))
    disc = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    volume = a * b * c * math.sqrt(disc) if disc > 0 else 0.0
    if volume < MIN_VOLUME:
        raise _Fail(R_CELL, f"angles {al:g}, {be:g}, {ga:g} give volume {volume:.3g} Å^3")
    if TAG_VOLUME in block.tags:
        try:
            stated = number(block.tags[TAG_VOLUME], TAG_VOLUME)
        except CifError as exc:
            raise _Fail(R_CELL, str(exc)) from None
        if abs(stated - volume) > VOLUME_RTOL * volume:
            raise _Fail(R_CELL, f"{TAG_VOLUME} {stated:g} but the cell parameters give {volume:.4f}")
    return Lattice.from_parameters(a, b, c, al, be, ga)


def _sites(block: CifBlock) -> list[Site]:
    try:
        site_list = sites(block)
    except CifError as exc:
        code = R_NO_SITES if str(exc).startswith("no atom") else R_SITES
        raise _Fail(code, str(exc)) from None
    for i, s in enumerate(site_list, 1):
        if max(abs(x) for x in s.frac) > MAX_ABS_COORD:
            raise _Fail(R_SITES, f"atom site {i}: fractional coordinate beyond ±{MAX_ABS_COORD:g}")
        if abs(s.occupancy - 1.0) > OCCUPANCY_TOL:
            raise _Fail(R_SITES, f"atom site {i}: occupancy {s.occupancy:g} (disorder is not supported)")
    return site_list


def _operators(block: CifBlock) -> tuple[np.ndarray, np.ndarray]:
    loop = block.loop_with(_XYZ) or block.loop_with(_XYZ_NEW)
    try:
        if loop is None:
            rots, trans = symmetry_operations(block)  # those of the stated space group
        else:
            ops = loop[_XYZ] if _XYZ in loop else loop[_XYZ_NEW]
            if not ops:
                raise _Fail(R_SYMOPS, "empty symmetry-operator loop")
            rots, trans = _parse_operators(tuple(ops))
    except CifError as exc:
        raise _Fail(R_SYMOPS, str(exc)) from None
    if len(rots) > MAX_OPERATORS:
        raise _Fail(R_SYMOPS, f"{len(rots)} operators; no space group has more than {MAX_OPERATORS}")
    dets = np.linalg.det(rots)
    bad = np.flatnonzero(np.abs(np.abs(dets) - 1.0) > 1e-6)
    if bad.size:
        raise _Fail(R_SYMOPS, f"operator {bad[0] + 1} is not a rotation (determinant {dets[bad[0]]:.3g})")
    return rots, trans


@lru_cache(maxsize=1024)
def _parse_operators(ops: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Operator loops repeat (one per space group in canonical CIFs), so parse each once."""
    rots, trans = symmetry_operations(CifBlock(loops=[{_XYZ: list(ops)}]))
    rots.flags.writeable = trans.flags.writeable = False  # shared between calls
    return rots, trans


def _expand(p: _Parsed) -> tuple[Structure, list[int]]:
    """The full cell and each site's orbit size (what cif.to_structure gives, with the operators parsed once)."""
    species: list[str] = []
    coords: list[np.ndarray] = []
    counts: list[int] = []
    for s in p.sites:
        pts = orbit(np.array(s.frac), p.rotations, p.translations)
        counts.append(len(pts))
        species.extend([s.symbol] * len(pts))
        coords.extend(pts)
    return Structure(p.lattice, species, coords), counts


@dataclass(frozen=True)
class _Contents:
    """Composition of the expanded cell, with the derived forms the formula checks compare to."""

    comp: Composition
    reduced: Composition
    units: int  # formula units in the cell
    text: str  # cell formula, data_-line style: Ba1Ti1O3
    reduced_formula: str  # pymatgen's: BaTiO3

    @classmethod
    def of(cls, structure: Structure) -> _Contents:
        comp = Composition(Counter(site.specie.symbol for site in structure))
        reduced, units = comp.get_reduced_composition_and_factor()
        return cls(comp, reduced, int(round(units)), compact_formula(cell_formula(comp)), comp.reduced_formula)


# ---------------------------------------------------------------- formula


def _formula(value: str, where: str) -> Composition:
    """A formula of real elements; raises ValueError naming ``where``."""
    try:
        comp = Composition(value)
    except Exception:
        raise ValueError(f"{where} {value!r} is not a formula") from None
    if not comp or any(not isinstance(el, Element) for el in comp):
        raise ValueError(f"{where} {value!r} is not a formula of known elements")
    return comp


def _sum_matches(stated: Composition, cell: Composition, z: int | None) -> bool:
    """The formula sum states the cell contents, or (IUCr convention) one of Z formula units."""
    return stated == cell or (z is not None and stated * z == cell)


def _z(block: CifBlock) -> int | None:
    raw = block.tags.get(TAG_Z)
    if raw is None:
        return None
    try:
        z = number(raw, TAG_Z)
    except CifError:
        raise ValueError(f"{TAG_Z} {raw!r} is not a number") from None
    if z != int(z) or z < 1:
        raise ValueError(f"{TAG_Z} {raw!r} is not a positive integer")
    return int(z)


def _formula_problems(block: CifBlock, cell: _Contents) -> list[str]:
    problems = []
    for check_one in (_name_problem, _sum_problem, _structural_problem):
        try:
            problem = check_one(block, cell)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            problems.append(problem)
    return problems


def _name_problem(block: CifBlock, cell: _Contents) -> str | None:
    """data_ name: pymatgen's reduced formula, a cell formula (all counts explicit) or a reduced one.

    A name that is not a formula of known elements (``data_global``, ``data_POSCAR``) states nothing.
    """
    name = block.name.strip()
    if not _FORMULA_NAME.fullmatch(name) or name == cell.reduced_formula:
        return None
    try:
        stated = _formula(name, "data_ line")
    except ValueError:
        return None
    if _EXPLICIT_COUNTS.fullmatch(name):
        if stated != cell.comp:
            return f"data_ line says {name} but sites give {cell.text}"
    elif stated.reduced_composition != cell.reduced:
        return f"data_ line says {name} but sites give {cell.reduced_formula}"
    return None


def _sum_problem(block: CifBlock, cell: _Contents) -> str | None:
    """_chemical_formula_sum: the cell contents; if so, Z must be the number of formula units."""
    z = _z(block)
    raw = block.tags.get(TAG_FORMULA_SUM)
    stated = None if raw is None else _formula(raw, TAG_FORMULA_SUM)
    if stated is not None and not _sum_matches(stated, cell.comp, z):
        return f"{TAG_FORMULA_SUM} says {raw} but sites give {cell.text}"
    if z is not None and (stated is None or stated == cell.comp) and z != cell.units:
        return f"{TAG_Z} is {z} but sites give {cell.units} formula units of {cell.reduced_formula}"
    return None


def _structural_problem(block: CifBlock, cell: _Contents) -> str | None:
    raw = block.tags.get(TAG_FORMULA_STRUCTURAL)
    if raw is None:
        return None
    if _formula(raw, TAG_FORMULA_STRUCTURAL).reduced_composition != cell.reduced:
        return f"{TAG_FORMULA_STRUCTURAL} says {raw} but sites give {cell.reduced_formula}"
    return None


# ---------------------------------------------------------------- multiplicity


def _multiplicity_problems(p: _Parsed, counts: list[int]) -> list[str]:
    """Stated multiplicities equal orbit sizes, and they add up to the formula sum."""
    problems = []
    for i, (s, n) in enumerate(zip(p.sites, counts, strict=True), 1):
        if s.multiplicity is not None and s.multiplicity != n:
            problems.append(f"atom site {i} ({s.symbol}) states {s.multiplicity} but its orbit has {n} positions")
    raw = p.block.tags.get(TAG_FORMULA_SUM)
    if raw is not None and not problems:
        totals: Counter[str] = Counter()
        for s, n in zip(p.sites, counts, strict=True):
            totals[s.symbol] += n if s.multiplicity is None else s.multiplicity
        try:
            stated, z = _formula(raw, TAG_FORMULA_SUM), _z(p.block)
        except ValueError:
            return problems  # the formula check reports an unreadable formula sum
        if not _sum_matches(stated, Composition(totals), z):
            shown = compact_formula(cell_formula(Composition(totals)))
            problems.append(f"multiplicities add up to {shown} but {TAG_FORMULA_SUM} says {raw}")
    return problems


# ---------------------------------------------------------------- bond lengths


@cache
def _radii(symbol: str) -> tuple[float, float, float | None, float | None]:
    """Electronegativity (NaN if none), covalent radius, anion radius, mean cation radius (Å).

    Covalent radii are Cordero et al. (2008) as tabulated by pymatgen; ionic radii are pymatgen's
    Shannon radii: the most negative oxidation state for the anion, the mean over positive states
    for the cation.
    """
    el = Element(symbol)
    x = float(el.X)
    cov = CovalentRadius.radius.get(symbol)
    if cov is None:  # superheavy elements: the tabulated atomic radius, else a typical metal radius
        cov = float(el.atomic_radius) if el.atomic_radius else 1.5
    ionic = {int(k): float(r) for k, r in el.ionic_radii.items()}
    negative = [k for k in ionic if k < 0]
    positive = [r for k, r in ionic.items() if k > 0]
    anion = ionic[min(negative)] if negative else None
    cation = sum(positive) / len(positive) if positive else None
    return x, float(cov), anion, cation


@cache
def expected_bond(a: str, b: str) -> float:
    """Expected bond length (Å): ionic radii sum if the electronegativity difference exceeds
    IONIC_DELTA_X (and both radii are known), else the covalent radii sum; bonds to H are covalent."""
    xa, cov_a, anion_a, cation_a = _radii(a)
    xb, cov_b, anion_b, cation_b = _radii(b)
    covalent = cov_a + cov_b
    if "H" in (a, b) or math.isnan(xa) or math.isnan(xb) or abs(xa - xb) <= IONIC_DELTA_X:
        return covalent
    cation, anion = (cation_a, anion_b) if xa < xb else (cation_b, anion_a)
    return covalent if cation is None or anion is None else cation + anion


@dataclass(frozen=True)
class _Neighbours:
    symbols: list[str]
    centers: np.ndarray  # pair i
    neighbors: np.ndarray  # pair j
    distances: np.ndarray  # Å
    nearest: np.ndarray  # per atom: smallest distance / expected bond length over its pairs (inf if none)


def _neighbours(structure: Structure) -> _Neighbours:
    """All pairs within LONG_FACTOR x the longest expected bond, which finds every pair that can
    decide whether an atom is reasonable; one vectorized neighbour search per structure."""
    symbols = [site.specie.symbol for site in structure]
    elements = sorted(set(symbols))
    index = {el: i for i, el in enumerate(elements)}
    expected = np.array([[expected_bond(a, b) for b in elements] for a in elements])
    kinds = np.array([index[s] for s in symbols])
    centers, neighbors, _, distances = structure.get_neighbor_list(LONG_FACTOR * float(expected.max()))
    nearest = np.full(len(structure), np.inf)
    np.minimum.at(nearest, centers, distances / expected[kinds[centers], kinds[neighbors]])
    return _Neighbours(symbols, centers, neighbors, distances, nearest)


def nearest_bond_ratios(structure: Structure) -> np.ndarray:
    """Per atom, the distance to its neighbours relative to the expected bond length, smallest over
    neighbours (inf where no neighbour is within LONG_FACTOR); what the bond score thresholds."""
    return _neighbours(structure).nearest


def _bond_check(structure: Structure) -> tuple[float, list[str]]:
    """Score = fraction of atoms whose nearest-neighbour ratio lies in [SHORT_FACTOR, LONG_FACTOR];
    plus an overlap check on absolute distances."""
    nb = _neighbours(structure)
    good = (nb.nearest >= SHORT_FACTOR) & (nb.nearest <= LONG_FACTOR)
    score = float(good.mean())
    problems = []
    close = np.flatnonzero(nb.distances < OVERLAP_DISTANCE)
    if close.size:
        k = close[np.argmin(nb.distances[close])]
        i, j = int(nb.centers[k]), int(nb.neighbors[k])
        problems.append(f"{R_OVERLAP}: {nb.symbols[i]} and {nb.symbols[j]} {nb.distances[k]:.3f} Å apart")
    if score < BOND_SCORE_THRESHOLD:
        problems.append(f"{R_BONDS}: score {score:.3f}; {_worst_atom(nb.symbols, nb.nearest)}")
    return score, problems


def _worst_atom(symbols: list[str], nearest: np.ndarray) -> str:
    """Describe the atom furthest outside the reasonable range."""
    bad = np.flatnonzero((nearest < SHORT_FACTOR) | (nearest > LONG_FACTOR))
    short = bad[nearest[bad] < SHORT_FACTOR]
    if short.size:
        i = int(short[np.argmin(nearest[short])])
        return f"{short.size} atom(s) too close, worst {symbols[i]} at {nearest[i]:.2f}x the expected bond length"
    i = int(bad[0])
    return f"{bad.size} isolated atom(s), e.g. {symbols[i]} with no neighbour within {LONG_FACTOR:g}x its bond length"


# ---------------------------------------------------------------- space group


def detect_spacegroup(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> int | None:
    """spglib's space-group number of ``structure`` at ``symprec``, or None if it finds none."""
    cell = (structure.lattice.matrix, structure.frac_coords, [site.specie.Z for site in structure])
    try:  # spglib returns None or raises, depending on version and settings
        ds = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:
        return None
    return None if ds is None else int(ds.number)


def _stated_spacegroup(block: CifBlock) -> tuple[int | None, str | None]:
    """The stated number (None if nothing usable is stated) and a problem with the statement."""
    raw_number = block.tags.get(TAG_SG_NUMBER)
    raw_symbol = block.tags.get(TAG_SG_SYMBOL)
    by_symbol = spacegroups.number(raw_symbol.replace(" ", "")) if raw_symbol else None
    if raw_number is None:
        return by_symbol, None
    try:
        n = int(raw_number)
    except ValueError:
        return None, f"{TAG_SG_NUMBER} {raw_number!r} is not an integer"
    if not 1 <= n <= 230:
        return None, f"{TAG_SG_NUMBER} {n} is not a space-group number"
    if by_symbol is not None and by_symbol != n:
        return n, f"{TAG_SG_SYMBOL} {raw_symbol} is group {by_symbol}, {TAG_SG_NUMBER} says {n}"
    return n, None


def _spacegroup_problems(p: _Parsed, structure: Structure) -> list[str]:
    """The stated group must be the group spglib finds at DEFAULT_SYMPREC; P1 is always true.

    With no usable statement, only a listing of the identity alone (an explicit P1 cell) is
    consistent.
    """
    stated, problem = _stated_spacegroup(p.block)
    if problem:
        return [problem]
    if stated is None:
        identity_only = (
            len(p.rotations) == 1 and np.array_equal(p.rotations[0], np.eye(3)) and not np.mod(p.translations, 1).any()
        )
        return [] if identity_only else [f"no space group stated for {len(p.rotations)} operators"]
    if stated == 1:
        return []
    found = detect_spacegroup(structure)
    if found is None:
        return [f"spglib finds no symmetry at symprec={DEFAULT_SYMPREC}"]
    if found != stated:
        return [
            f"stated {stated} ({spacegroups.symbol(stated)}) but spglib finds {found} ({spacegroups.symbol(found)})"
        ]
    return []


# ---------------------------------------------------------------- the published rule (CDVAE, DiffCSP)

PUBLISHED_MIN_DISTANCE = 0.5  # Å: no two atoms closer
PUBLISHED_MIN_VOLUME = 0.1  # Å^3


@dataclass(frozen=True)
class PublishedValidity:
    """The validity rule of the CDVAE and DiffCSP papers, so that figures can stand beside their tables.

    It is much weaker than :func:`check`: a structure is *structurally* valid when its cell has a volume of
    at least 0.1 Å³ and no two atoms are closer than 0.5 Å, and *compositionally* valid when SMACT finds
    charge-neutral oxidation states that pass Pauling's electronegativity test (a single element, or only
    metals, always pass). Nothing is asked of the stated formula, multiplicities, bonds or space group.
    """

    structure_ok: bool = False
    composition_ok: bool = False

    @property
    def is_valid(self) -> bool:
        return self.structure_ok and self.composition_ok


def check_published(text: str) -> PublishedValidity:
    """Judge one CIF by the published rule. Never raises: a CIF that cannot be read is invalid."""
    from crystallm_core.cif import parse_structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = parse_structure(text)
            return PublishedValidity(_published_structure_ok(structure), _smact_ok(structure.composition))
    except Exception:
        return PublishedValidity()


def _published_structure_ok(structure: Structure) -> bool:
    if not structure.volume >= PUBLISHED_MIN_VOLUME:  # also false for NaN
        return False
    if len(structure) < 2:
        return True
    d = structure.distance_matrix
    np.fill_diagonal(d, np.inf)
    return bool(d.min() >= PUBLISHED_MIN_DISTANCE)


@lru_cache(maxsize=4096)
def _smact_formula_ok(formula: str) -> bool:
    from smact.screening import smact_validity

    # The papers' SMACT (2.x) took oxidation states from its own 2014 table; 4.x names it "smact14".
    return bool(smact_validity(formula, use_pauling_test=True, include_alloys=True, oxidation_states_set="smact14"))


def _smact_ok(composition: Composition) -> bool:
    """SMACT's charge-neutrality and electronegativity screen of the cell's composition (memoised: a CSP
    run asks the same few compositions thousands of times)."""
    return _smact_formula_ok(composition.formula.replace(" ", ""))
