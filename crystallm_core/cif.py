"""Canonical CIF: one deterministic text form per crystal, and a tolerant reader.

The canonical form is what the tokenizer, the data sets and the model all speak.
Its layout is documented in docs/CIF_FORMAT.md; in short, a structure is
symmetrized with spglib (``symprec``, default 0.1 Å), put in the standard
conventional cell of its space group's default setting, and written as the
asymmetric unit with Wyckoff multiplicities, the full list of symmetry operators
and an atom-properties block, every number rounded to ``decimals`` places.

The reader (:func:`read_cif`, :func:`to_structure`) accepts any plain CIF (ours,
pymatgen's, model output) and raises only :class:`CifError` with a reason, which
the validity checks turn into an "invalid" verdict.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import cache

os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib prints C-level warnings to stderr otherwise

import numpy as np  # noqa: E402
import spglib  # noqa: E402
from pymatgen.core import Composition, Element, Lattice, Structure  # noqa: E402

from crystallm_core import spacegroups  # noqa: E402

DEFAULT_SYMPREC = 0.1
DEFAULT_DECIMALS = 4

TAG_SG_SYMBOL = "_symmetry_space_group_name_H-M"
TAG_SG_NUMBER = "_symmetry_Int_Tables_number"
CELL_TAGS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
TAG_VOLUME = "_cell_volume"
TAG_Z = "_cell_formula_units_Z"
TAG_FORMULA_STRUCTURAL = "_chemical_formula_structural"
TAG_FORMULA_SUM = "_chemical_formula_sum"
SYMOPS_HEADER = "loop_\n_symmetry_equiv_pos_site_id\n_symmetry_equiv_pos_as_xyz\n"
PROPS_HEADER = "loop_\n_atom_type_symbol\n_atom_type_electronegativity\n_atom_type_radius\n_atom_type_ionic_radius\n"
SITES_HEADER = (
    "loop_\n_atom_site_type_symbol\n_atom_site_label\n_atom_site_symmetry_multiplicity\n"
    "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
)


class CifError(ValueError):
    """A CIF that cannot be read or canonicalized; the message is the reason."""


@dataclass(frozen=True)
class Canonical:
    """A canonical CIF and the facts the data set store indexes it by."""

    text: str
    formula: str  # cell formula, pymatgen order, e.g. "Ba1 Ti1 O3"
    reduced_formula: str
    elements: tuple[str, ...]
    nsites: int  # sites in the conventional cell
    spacegroup_number: int
    spacegroup_symbol: str
    volume: float
    z: int

    @property
    def volume_per_formula_unit(self) -> float:
        return self.volume / self.z


def fmt(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return "0." + "0" * decimals if s.lstrip("-").strip("0.") == "" else s


@cache
def atom_properties(symbol: str) -> tuple[float, float, float]:
    """Electronegativity (Pauling), atomic radius and mean ionic radius (Å); 0 where unknown."""
    el = Element(symbol)

    def clean(v: object) -> float:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return 0.0
        return 0.0 if math.isnan(f) else f

    return clean(el.X), clean(el.atomic_radius), clean(el.average_ionic_radius)


def compact_formula(formula: str) -> str:
    """'Ba1 Ti1 O3' -> 'Ba1Ti1O3' (the data_ line form)."""
    return formula.replace(" ", "")


def cell_formula(comp: Composition) -> str:
    """Cell formula with integer counts in pymatgen's electronegativity order."""
    return " ".join(f"{el.symbol}{int(round(n))}" for el, n in sorted(comp.items(), key=lambda kv: kv[0].X))


def _dataset(cell: tuple, symprec: float):  # noqa: ANN202 (spglib's dataset type moved between versions)
    try:  # spglib either returns None or raises, depending on its version and settings
        return spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:
        return None


def detect_spacegroup_number(cell: Expanded, symprec: float = DEFAULT_SYMPREC) -> int | None:
    """The space-group number spglib finds for an expanded CIF, or None where it finds no symmetry."""
    ds = _dataset(cell.spglib_cell(), symprec)
    return None if ds is None else int(ds.number)


def canonicalize(structure: Structure, decimals: int = DEFAULT_DECIMALS, symprec: float = DEFAULT_SYMPREC) -> Canonical:
    """Symmetrize ``structure`` and write it in canonical form.

    Idealizing can move atoms to within ``symprec`` of a higher-symmetry arrangement, so the
    text is read back and, while its group differs from the one it states, canonicalized again:
    a canonical CIF re-detects as the space group it names. Raises :class:`CifError` for
    disordered structures and where spglib finds no symmetry dataset at ``symprec``.
    """
    canon = _canonicalize_once(structure, decimals, symprec)
    for _ in range(3):
        cell = expand(read_cif(canon.text))
        detected = detect_spacegroup_number(cell, symprec)
        if detected is None or detected == canon.spacegroup_number:
            break
        canon = _canonicalize_once(Structure(cell.lattice, cell.symbols, cell.frac), decimals, symprec)
    return canon


def _canonicalize_once(structure: Structure, decimals: int, symprec: float) -> Canonical:
    if not structure.is_ordered:
        raise CifError("disordered structure (partial occupancies) is not supported")
    numbers = [site.specie.Z for site in structure]
    cell = (structure.lattice.matrix, structure.frac_coords, numbers)
    ds = _dataset(cell, symprec)
    if ds is None:
        raise CifError(f"spglib found no symmetry at symprec={symprec}")
    sg = ds.number
    if ds.hall_number != spacegroups.hall_number(sg):
        raise CifError(f"spglib standardized space group {sg} to a non-default setting (Hall {ds.hall_number})")
    std = (ds.std_lattice, ds.std_positions, ds.std_types)
    # The standard cell is idealized, so a tight tolerance re-finds the same group
    # and gives the orbits (equivalent atoms) of the conventional cell.
    ds2 = _dataset(std, 1e-3)
    if ds2 is None or ds2.number != sg:
        raise CifError("standardized cell lost its symmetry")
    lattice = Lattice(ds.std_lattice)
    positions = np.mod(np.asarray(ds.std_positions, dtype=float), 1.0)
    types = np.asarray(ds.std_types)
    orbits: dict[int, list[int]] = {}
    for i, rep in enumerate(ds2.equivalent_atoms):
        orbits.setdefault(int(rep), []).append(i)

    def wrapped(i: int) -> tuple[float, ...]:
        # Round first so that 0.99999 and 0.0 are the same coordinate.
        return tuple(round(float(v), decimals) % 1.0 for v in positions[i])

    symbols_by_z = {z: Element.from_Z(int(z)).symbol for z in set(types.tolist())}
    comp = Composition({symbols_by_z[int(z)]: int(c) for z, c in zip(*np.unique(types, return_counts=True))})
    formula = cell_formula(comp)
    order = {el.symbol: k for k, (el, _) in enumerate(sorted(comp.items(), key=lambda kv: kv[0].X))}
    sites = []
    for members in orbits.values():
        sym = symbols_by_z[int(types[members[0]])]
        coords = min(wrapped(i) for i in members)
        sites.append((order[sym], len(members), coords, sym))
    sites.sort()

    reduced, factor = comp.get_reduced_composition_and_factor()
    z = int(round(factor))
    a, b, c = lattice.abc
    al, be, ga = lattice.angles
    f = lambda x: fmt(x, decimals)  # noqa: E731
    lines = [
        f"data_{compact_formula(formula)}",
        f"{TAG_SG_SYMBOL} {spacegroups.symbol(sg)}",
        f"{TAG_SG_NUMBER} {sg}",
        f"_cell_length_a {f(a)}",
        f"_cell_length_b {f(b)}",
        f"_cell_length_c {f(c)}",
        f"_cell_angle_alpha {f(al)}",
        f"_cell_angle_beta {f(be)}",
        f"_cell_angle_gamma {f(ga)}",
        f"{TAG_VOLUME} {f(cell_volume(*(round(x, decimals) for x in (a, b, c, al, be, ga))))}",
        f"{TAG_Z} {z}",
        f"{TAG_FORMULA_STRUCTURAL} {reduced.reduced_formula}",
        f"{TAG_FORMULA_SUM} '{formula}'",
    ]
    text = "\n".join(lines) + "\n" + symops_block(sg)
    text += PROPS_HEADER
    for el in order:
        text += " ".join([el, *(f(p) for p in atom_properties(el))]) + "\n"
    text += SITES_HEADER
    for k, (_, mult, coords, sym) in enumerate(sites):
        text += f"{sym} {sym}{k} {mult} {f(coords[0])} {f(coords[1])} {f(coords[2])} 1\n"
    return Canonical(
        text=text,
        formula=formula,
        reduced_formula=reduced.reduced_formula,
        elements=tuple(order),
        nsites=len(types),
        spacegroup_number=sg,
        spacegroup_symbol=spacegroups.symbol(sg),
        volume=float(lattice.volume),
        z=z,
    )


def cell_volume(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> float:
    """Volume of a cell from its parameters (degrees); NaN when the angles admit no cell.

    Canonical CIFs state the volume of the cell parameters as written (rounded), so the stated
    volume is an exact function of the text, which post-processing can recompute.
    """
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    disc = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    return a * b * c * math.sqrt(disc) if disc > 0 else math.nan


@cache
def symops_block(sg_number: int) -> str:
    """The symmetry-operator loop of a canonical CIF of space group ``sg_number``."""
    ops = spacegroups.operations_xyz(sg_number)
    return SYMOPS_HEADER + "".join(f"{i} '{op}'\n" for i, op in enumerate(ops, 1))


# ---------------------------------------------------------------- reading

_WORD = re.compile(r"'[^']*'|\"[^\"]*\"|\S+")


@dataclass
class CifBlock:
    """Tags and loops of one CIF data block, values as raw strings."""

    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    loops: list[dict[str, list[str]]] = field(default_factory=list)

    def loop_with(self, tag: str) -> dict[str, list[str]] | None:
        return next((lp for lp in self.loops if tag in lp), None)


def _unquote(v: str) -> str:
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v


def read_cif(text: str) -> CifBlock:
    """Parse the first data block of ``text``; raises CifError with the line that broke it."""
    if not isinstance(text, str) or not text.strip():
        raise CifError("empty CIF")
    block = CifBlock()
    seen_data = False
    loop_tags: list[str] | None = None
    loop_values: list[str] = []
    in_header = False
    pending_tag: str | None = None

    def close_loop() -> None:
        nonlocal loop_tags, loop_values
        if loop_tags is None:
            return
        n = len(loop_tags)
        if n == 0 or len(loop_values) % n:
            raise CifError(f"loop of {loop_tags[:1]} has {len(loop_values)} values for {n} columns")
        block.loops.append({t: loop_values[i::n] for i, t in enumerate(loop_tags)})
        loop_tags, loop_values = None, []

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            if seen_data:
                break
            seen_data = True
            block.name = line[5:]
            continue
        if pending_tag is not None:
            block.tags[pending_tag] = _unquote(line)
            pending_tag = None
            continue
        if line == "loop_":
            close_loop()
            loop_tags, in_header = [], True
            continue
        if line.startswith("_"):
            if loop_tags is not None and in_header:
                loop_tags.append(line.split()[0])
                continue
            close_loop()
            words = _WORD.findall(line)
            if len(words) == 1:
                pending_tag = words[0]
            elif len(words) == 2:
                block.tags[words[0]] = _unquote(words[1])
            else:
                raise CifError(f"line {lineno}: tag {words[0]} has {len(words) - 1} values")
            continue
        if loop_tags is None:
            raise CifError(f"line {lineno}: value outside a tag or loop: {line[:40]!r}")
        in_header = False
        loop_values.extend(_unquote(w) for w in _WORD.findall(line))
    close_loop()
    if not seen_data:
        raise CifError("no data_ block")
    return block


_NUM = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def number(value: str, what: str) -> float:
    """A CIF number; a standard uncertainty in brackets is ignored."""
    m = _NUM.match(value.strip())
    if not m:
        raise CifError(f"{what}: not a number: {value[:20]!r}")
    v = float(m.group(0))
    if not math.isfinite(v):
        raise CifError(f"{what}: not finite")
    return v


def _parse_xyz(op: str) -> tuple[np.ndarray, np.ndarray]:
    rot = np.zeros((3, 3))
    trans = np.zeros(3)
    parts = op.replace(" ", "").lower().split(",")
    if len(parts) != 3:
        raise CifError(f"symmetry operator {op!r} has {len(parts)} parts")
    for i, part in enumerate(parts):
        for sign, coef, axis, num, den in re.findall(r"([+-]?)(?:(\d*\.?\d*)\*?([xyz])|(\d+\.?\d*)(?:/(\d+))?)", part):
            s = -1.0 if sign == "-" else 1.0
            try:
                if axis:
                    rot[i, "xyz".index(axis)] += s * (float(coef) if coef else 1.0)
                elif num:
                    trans[i] += s * float(num) / (float(den) if den else 1.0)
            except (ValueError, ZeroDivisionError):
                raise CifError(f"symmetry operator {op!r} is malformed") from None
        if not re.fullmatch(r"([+-]?(\d+\.?\d*\*?[xyz]|\d*\*?[xyz]|\d+\.?\d*(/[1-9]\d*)?))+", parts[i]):
            raise CifError(f"symmetry operator {op!r} is malformed")
    return rot, trans


@dataclass(frozen=True)
class Site:
    symbol: str
    frac: tuple[float, float, float]
    multiplicity: int | None
    occupancy: float


def cell_parameters(block: CifBlock) -> tuple[float, ...]:
    missing = [t for t in CELL_TAGS if t not in block.tags]
    if missing:
        raise CifError(f"missing {', '.join(missing)}")
    return tuple(number(block.tags[t], t) for t in CELL_TAGS)


def sites(block: CifBlock) -> list[Site]:
    loop = block.loop_with("_atom_site_fract_x")
    if loop is None:
        raise CifError("no atom-site loop with fractional coordinates")
    missing = [f"_atom_site_fract_{a}" for a in "yz" if f"_atom_site_fract_{a}" not in loop]
    if missing:
        raise CifError(f"atom-site loop lacks {', '.join(missing)}")
    sym_col = loop.get("_atom_site_type_symbol") or loop.get("_atom_site_label")
    if sym_col is None:
        raise CifError("atom-site loop has neither _atom_site_type_symbol nor _atom_site_label")
    out = []
    for i, raw in enumerate(sym_col):
        m = re.match(r"[A-Z][a-z]?", raw)
        if not m or not Element.is_valid_symbol(m.group(0)):
            raise CifError(f"atom site {i + 1}: unknown element {raw!r}")
        xyz = tuple(number(loop[f"_atom_site_fract_{a}"][i], f"atom site {i + 1} {a}") for a in "xyz")
        mult = loop.get("_atom_site_symmetry_multiplicity")
        occ = loop.get("_atom_site_occupancy")
        out.append(
            Site(
                symbol=m.group(0),
                frac=xyz,  # type: ignore[arg-type]
                multiplicity=int(number(mult[i], "multiplicity")) if mult else None,
                occupancy=number(occ[i], "occupancy") if occ else 1.0,
            )
        )
    if not out:
        raise CifError("no atom sites")
    return out


def symmetry_operations(block: CifBlock) -> tuple[np.ndarray, np.ndarray]:
    """Operators listed in the CIF, or those of its space group when it lists none."""
    loop = block.loop_with("_symmetry_equiv_pos_as_xyz") or block.loop_with("_space_group_symop_operation_xyz")
    if loop is not None:
        ops = loop.get("_symmetry_equiv_pos_as_xyz", loop.get("_space_group_symop_operation_xyz", []))
        if not ops:
            raise CifError("empty symmetry-operator loop")
        parsed = [_parse_xyz(op) for op in ops]
        return np.array([r for r, _ in parsed]), np.array([t for _, t in parsed])
    sg = spacegroup_number(block)
    if sg is None:
        raise CifError("no symmetry operators and no space group")
    return spacegroups.operations(sg)


def spacegroup_number(block: CifBlock) -> int | None:
    """Space-group number from the number tag, else from the symbol; None if neither is usable."""
    if TAG_SG_NUMBER in block.tags:
        try:
            n = int(block.tags[TAG_SG_NUMBER])
        except ValueError:
            return None
        return n if 1 <= n <= 230 else None
    sym = block.tags.get(TAG_SG_SYMBOL, "").replace(" ", "")
    return spacegroups.number(sym)


def orbit(frac: np.ndarray, rots: np.ndarray, trans: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Distinct images of one fractional position under the operators (first of each close group kept)."""
    images = np.mod(rots @ frac + trans, 1.0)
    images[1.0 - images <= tol + 1e-5] = 0.0
    delta = images[None, :, :] - images[:, None, :]
    close = np.abs((delta + 0.5) % 1.0 - 0.5).max(axis=2) <= tol
    removed = np.zeros(len(images), dtype=bool)
    keep = []
    for i in range(len(images)):
        if not removed[i]:
            keep.append(i)
            removed |= close[i]
    return images[keep]


@dataclass(frozen=True)
class Expanded:
    """The full cell of a CIF as plain arrays (cheaper than a pymatgen Structure when only spglib needs it)."""

    lattice: Lattice
    symbols: list[str]
    frac: np.ndarray
    counts: list[int]  # orbit size of each listed site (what its multiplicity should be)

    def spglib_cell(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        return self.lattice.matrix, self.frac, [_atomic_number(s) for s in self.symbols]


@cache
def _atomic_number(symbol: str) -> int:
    return Element(symbol).Z


def expand(block: CifBlock) -> Expanded:
    """Apply the symmetry operators to the asymmetric unit."""
    a, b, c, al, be, ga = cell_parameters(block)
    if min(a, b, c) <= 0:
        raise CifError("cell length is not positive")
    lattice = Lattice.from_parameters(a, b, c, al, be, ga)
    if not math.isfinite(lattice.volume) or lattice.volume <= 1e-6:
        raise CifError("cell angles give no volume")
    rots, trans = symmetry_operations(block)
    symbols, coords, counts = [], [], []
    for s in sites(block):
        pts = orbit(np.array(s.frac), rots, trans)
        counts.append(len(pts))
        symbols.extend([s.symbol] * len(pts))
        coords.append(pts)
    return Expanded(lattice, symbols, np.concatenate(coords), counts)


def to_structure(block: CifBlock) -> tuple[Structure, list[int]]:
    """The full cell as a pymatgen Structure, and each listed site's orbit size."""
    cell = expand(block)
    return Structure(cell.lattice, cell.symbols, cell.frac), cell.counts


def parse_structure(text: str) -> Structure:
    """Read a CIF into a pymatgen Structure (any CIF pymatgen can read, too)."""
    try:
        return to_structure(read_cif(text))[0]
    except CifError:
        raise
    except Exception as exc:  # numeric edge cases in pymatgen/numpy are still just bad CIFs
        raise CifError(f"{type(exc).__name__}: {exc}") from None
