"""The built-in demo data set: small, chemically plausible crystals that need no download.

Structures come from eleven textbook prototypes (rock salt, CsCl, zinc blende, wurtzite,
fluorite, anti-fluorite, rutile, cubic perovskite, spinel, NiAs, CdI2). Each prototype has
families of ions that may sit on its sites together (compatible oxidation states and
coordination), and its lattice follows from Shannon radii by the prototype's geometry, so
nearest-neighbour distances equal the sum of the radii. Selection is deterministic by seed
and balanced over prototypes. Rules and constants are documented in docs/DEMO_DATA.md.

``crystallm demo-data --out FILE.csv[.gz]`` writes the set as a CSV with the columns
``material_id``, ``cif``, ``formula`` and ``prototype``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TextIO

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

from crystallm_core import spacegroups
from crystallm_core.events import open_sink

Point = tuple[float, float, float]
Geometry = Callable[[dict[str, float]], tuple[Lattice, dict[str, Point]]]

CSV_COLUMNS = ("material_id", "cif", "formula", "prototype")
ID_PREFIX = "demo-"

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10, "XII": 12}


@cache
def shannon_radius(element: str, oxidation: int, cn: int) -> float:
    """Shannon crystal radius (Å) of an ion at coordination ``cn``, or at the nearest tabulated one.

    Crystal radii are the scale of pymatgen's ``Species.ionic_radius``; a cation-anion sum equals
    the sum of the (Shannon) ionic radii. High spin is preferred where both spins are tabulated.
    """
    table = Element(element).data.get("Shannon radii", {}).get(str(oxidation), {})
    by_cn = {_ROMAN[k]: spins for k, spins in table.items() if k in _ROMAN}  # drops square-planar etc.
    if not by_cn:
        raise ValueError(f"no Shannon radius for {element}{oxidation:+d}")
    spins = by_cn[min(by_cn, key=lambda c: (abs(c - cn), c))]
    entry = spins.get("High Spin") or spins.get("") or next(iter(spins.values()))
    return float(entry["crystal_radius"])


# ---------------------------------------------------------------- geometry of each prototype
# Each rule takes the Shannon radius of every site role and returns the lattice and one
# representative position per role, in the default setting of the prototype's space group.


def _bond(r: dict[str, float], cation: str, anion: str = "X") -> float:
    return r[cation] + r[anion]


def _rocksalt(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    return Lattice.cubic(2 * _bond(r, "A")), {"A": (0, 0, 0), "X": (0.5, 0.5, 0.5)}


def _cscl(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    return Lattice.cubic(2 * _bond(r, "A") / math.sqrt(3)), {"A": (0, 0, 0), "X": (0.5, 0.5, 0.5)}


def _zincblende(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    return Lattice.cubic(4 * _bond(r, "A") / math.sqrt(3)), {"A": (0, 0, 0), "X": (0.25, 0.25, 0.25)}


def _fluorite(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Cation A on the fcc sites, anions X in all tetrahedral holes."""
    return Lattice.cubic(4 * _bond(r, "A") / math.sqrt(3)), {"A": (0, 0, 0), "X": (0.25, 0.25, 0.25)}


def _antifluorite(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Anion X on the fcc sites, cations A in all tetrahedral holes."""
    return Lattice.cubic(4 * _bond(r, "A") / math.sqrt(3)), {"A": (0.25, 0.25, 0.25), "X": (0, 0, 0)}


def _wurtzite(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Ideal wurtzite: c/a = sqrt(8/3), u = 3/8, so all four bonds are equal."""
    c = 8 * _bond(r, "A") / 3
    return Lattice.hexagonal(c * math.sqrt(3 / 8), c), {"A": (1 / 3, 2 / 3, 0), "X": (1 / 3, 2 / 3, 3 / 8)}


RUTILE_C_OVER_A = 0.65  # observed 0.63 (VO2) to 0.69 (RuO2)


def _rutile(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Fixed c/a; x of the anion makes the apical and equatorial bonds equal."""
    x = 0.25 + RUTILE_C_OVER_A**2 / 8
    a = _bond(r, "A") / (math.sqrt(2) * x)
    return Lattice.tetragonal(a, RUTILE_C_OVER_A * a), {"A": (0, 0, 0), "X": (x, x, 0)}


def perovskite_tolerance(r: dict[str, float]) -> float:
    """Goldschmidt tolerance factor t = (rA + rX) / (sqrt(2) (rB + rX))."""
    return _bond(r, "A") / (math.sqrt(2) * _bond(r, "B"))


def _perovskite(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Mean of the cell edges the B-X bond (2 dBX) and the A-X bond (sqrt(2) dAX) ask for."""
    a = (2 * _bond(r, "B") + math.sqrt(2) * _bond(r, "A")) / 2
    return Lattice.cubic(a), {"B": (0, 0, 0), "X": (0.5, 0, 0), "A": (0.5, 0.5, 0.5)}


def _spinel_distances(u: float) -> tuple[float, float]:
    """Tetrahedral and octahedral cation-anion distances over a, for anion parameter u (origin choice 1)."""
    return math.sqrt(3) * (u - 0.25), math.sqrt(3 * u * u - 11 * u / 4 + 43 / 64)


def _spinel(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    """Anion parameter u solved so that d(A-X) / d(B-X) matches the radii, within 0.355..0.395."""
    target = _bond(r, "A") / _bond(r, "B")
    lo, hi = 0.355, 0.395  # the tet/oct ratio rises with u over this range
    for _ in range(40):
        mid = (lo + hi) / 2
        tet, oct_ = _spinel_distances(mid)
        lo, hi = (mid, hi) if tet / oct_ < target else (lo, mid)
    u = (lo + hi) / 2
    a = _bond(r, "B") / _spinel_distances(u)[1]
    return Lattice.cubic(a), {"A": (0, 0, 0), "B": (0.625, 0.625, 0.625), "X": (u, u, u)}


NIAS_C_OVER_A = 1.6  # observed 1.4 (NiAs) to 1.7 (FeS)
CDI2_C_OVER_A = 1.6  # observed 1.6 (CdI2) to 1.7 (TiS2)


def _hexagonal_octahedral(r: dict[str, float], c_over_a: float) -> float:
    """Cell edge a for a cation at the origin bonded to anions at (1/3, 2/3, ±1/4)."""
    return _bond(r, "A") / math.sqrt(1 / 3 + c_over_a**2 / 16)


def _nias(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    a = _hexagonal_octahedral(r, NIAS_C_OVER_A)
    return Lattice.hexagonal(a, NIAS_C_OVER_A * a), {"A": (0, 0, 0), "X": (1 / 3, 2 / 3, 0.25)}


def _cdi2(r: dict[str, float]) -> tuple[Lattice, dict[str, Point]]:
    a = _hexagonal_octahedral(r, CDI2_C_OVER_A)
    return Lattice.hexagonal(a, CDI2_C_OVER_A * a), {"A": (0, 0, 0), "X": (1 / 3, 2 / 3, 0.25)}


# ---------------------------------------------------------------- prototypes and their chemistry

Family = dict[str, tuple[tuple[str, ...], int]]  # role -> (elements, oxidation state)

_CHALCOGENS = ("O", "S", "Se", "Te")
_HEAVY_CHALCOGENS = ("S", "Se", "Te")
_HALIDES = ("F", "Cl", "Br", "I")
_HEAVY_HALIDES = ("Cl", "Br", "I")


@dataclass(frozen=True)
class Prototype:
    """A structure type: its space group, site roles, ion families and lattice rule."""

    name: str
    spacegroup: int
    stoichiometry: dict[str, int]  # role -> atoms per formula unit
    coordination: dict[str, int]  # role -> coordination number, for the Shannon radius
    families: tuple[Family, ...]
    geometry: Geometry
    accept: Callable[[dict[str, float]], bool] = lambda radii: True


PROTOTYPES: dict[str, Prototype] = {
    p.name: p
    for p in (
        Prototype(
            "rocksalt",
            225,
            {"A": 1, "X": 1},
            {"A": 6, "X": 6},
            (
                {"A": (("Mg", "Ca", "Sr", "Ba", "Mn", "Fe", "Co", "Ni", "Cd", "Pb", "Eu"), 2), "X": (_CHALCOGENS, -2)},
                {"A": (("Li", "Na", "K", "Rb", "Ag"), 1), "X": (_HALIDES, -1)},
                {"A": (("Sc", "Y", "La", "Gd"), 3), "X": (("N",), -3)},
            ),
            _rocksalt,
        ),
        Prototype(
            "cscl",
            221,
            {"A": 1, "X": 1},
            {"A": 8, "X": 8},
            (
                {"A": (("K", "Rb", "Cs", "Tl"), 1), "X": (_HEAVY_HALIDES, -1)},
                {"A": (("Ca", "Sr", "Ba"), 2), "X": (_CHALCOGENS, -2)},
            ),
            _cscl,
        ),
        Prototype(
            "zincblende",
            216,
            {"A": 1, "X": 1},
            {"A": 4, "X": 4},
            (
                {"A": (("Be", "Mn", "Zn", "Cd", "Hg"), 2), "X": (_HEAVY_CHALCOGENS, -2)},
                {"A": (("Cu", "Ag"), 1), "X": (_HEAVY_HALIDES, -1)},
                {"A": (("B", "Al", "Ga", "In"), 3), "X": (("N",), -3)},
            ),
            _zincblende,
        ),
        Prototype(
            "wurtzite",
            186,
            {"A": 1, "X": 1},
            {"A": 4, "X": 4},
            (
                {"A": (("Be", "Mg", "Mn", "Zn", "Cd"), 2), "X": (_CHALCOGENS, -2)},
                {"A": (("Cu", "Ag"), 1), "X": (_HEAVY_HALIDES, -1)},
                {"A": (("Al", "Ga", "In"), 3), "X": (("N",), -3)},
            ),
            _wurtzite,
        ),
        Prototype(
            "fluorite",
            225,
            {"A": 1, "X": 2},
            {"A": 8, "X": 4},
            (
                {"A": (("Ca", "Sr", "Ba", "Cd", "Pb", "Eu"), 2), "X": (("F",), -1)},
                {"A": (("Sr", "Ba"), 2), "X": (("Cl",), -1)},
                {"A": (("Zr", "Hf", "Ce", "Pr", "Tb", "Th", "U", "Np", "Pu", "Am"), 4), "X": (("O",), -2)},
            ),
            _fluorite,
        ),
        Prototype(
            "antifluorite",
            225,
            {"A": 2, "X": 1},
            {"A": 4, "X": 8},
            (
                {"A": (("Li", "Na", "K", "Rb"), 1), "X": (_CHALCOGENS, -2)},
                {"A": (("Cu",), 1), "X": (_HEAVY_CHALCOGENS, -2)},
            ),
            _antifluorite,
        ),
        Prototype(
            "rutile",
            136,
            {"A": 1, "X": 2},
            {"A": 6, "X": 3},
            (
                {
                    "A": (("Ti", "V", "Cr", "Mn", "Ge", "Nb", "Mo", "Ru", "Rh", "Sn", "Os", "Ir", "Pb"), 4),
                    "X": (("O",), -2),
                },
                {"A": (("Mg", "Mn", "Fe", "Co", "Ni", "Zn", "Pd"), 2), "X": (("F",), -1)},
            ),
            _rutile,
        ),
        Prototype(
            "perovskite",
            221,
            {"A": 1, "B": 1, "X": 3},
            {"A": 12, "B": 6, "X": 6},
            (
                {
                    "A": (("Ca", "Sr", "Ba", "Pb", "Eu"), 2),
                    "B": (("Ti", "V", "Mn", "Zr", "Mo", "Ru", "Sn", "Hf"), 4),
                    "X": (("O",), -2),
                },
                {
                    "A": (("La", "Pr", "Nd", "Sm", "Bi"), 3),
                    "B": (("Al", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Ga", "In"), 3),
                    "X": (("O",), -2),
                },
                {"A": (("Na", "K", "Ag"), 1), "B": (("V", "Nb", "Ta"), 5), "X": (("O",), -2)},
                {
                    "A": (("Na", "K", "Rb", "Cs"), 1),
                    "B": (("Mg", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Cd"), 2),
                    "X": (("F",), -1),
                },
                {"A": (("Cs",), 1), "B": (("Ge", "Pb"), 2), "X": (_HEAVY_HALIDES, -1)},
            ),
            _perovskite,
            lambda radii: 0.85 <= perovskite_tolerance(radii) <= 1.06,
        ),
        Prototype(
            "spinel",
            227,
            {"A": 1, "B": 2, "X": 4},
            {"A": 4, "B": 6, "X": 4},
            (
                {
                    "A": (("Mg", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Cd"), 2),
                    "B": (("Al", "V", "Cr", "Mn", "Fe", "Co", "Ga", "Rh"), 3),
                    "X": (("O",), -2),
                },
                {"A": (("Mn", "Fe", "Co", "Zn", "Cd", "Hg"), 2), "B": (("Cr", "In"), 3), "X": (("S", "Se"), -2)},
                {"A": (("Si", "Ge"), 4), "B": (("Mg", "Fe", "Co", "Ni"), 2), "X": (("O",), -2)},
            ),
            _spinel,
        ),
        Prototype(
            "nias",
            194,
            {"A": 1, "X": 1},
            {"A": 6, "X": 6},
            ({"A": (("Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni"), 2), "X": (_HEAVY_CHALCOGENS, -2)},),
            _nias,
        ),
        Prototype(
            "cdi2",
            164,
            {"A": 1, "X": 2},
            {"A": 6, "X": 3},
            (
                {"A": (("Ti", "Zr", "Hf", "Sn", "Pt"), 4), "X": (_HEAVY_CHALCOGENS, -2)},
                {"A": (("Mg", "Ca", "V", "Mn", "Fe", "Co", "Cd"), 2), "X": (("Br", "I"), -1)},
            ),
            _cdi2,
        ),
    )
}


def _orbit(point: np.ndarray, rots: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Distinct images of a position, compared after rounding so that 0.9999999 and 0 are one coordinate."""
    images = np.mod(rots @ point + trans, 1.0)
    images[np.isclose(images, 1.0)] = 0.0
    _, first = np.unique(np.round(images, 6) % 1.0, axis=0, return_index=True)
    return images[np.sort(first)]


@dataclass(frozen=True)
class Candidate:
    """One composition of one prototype: the ion (element, oxidation state) on each role."""

    prototype: Prototype
    ions: dict[str, tuple[str, int]]

    @property
    def radii(self) -> dict[str, float]:
        return {
            role: shannon_radius(el, oxi, self.prototype.coordination[role]) for role, (el, oxi) in self.ions.items()
        }

    @property
    def reduced_formula(self) -> str:
        counts = {el: self.prototype.stoichiometry[role] for role, (el, _) in self.ions.items()}
        return Composition(counts).reduced_formula

    def structure(self) -> Structure:
        """The conventional cell, every orbit expanded with the space group's own operators."""
        lattice, positions = self.prototype.geometry(self.radii)
        rots, trans = spacegroups.operations(self.prototype.spacegroup)
        species: list[str] = []
        coords: list[np.ndarray] = []
        for role, point in positions.items():
            images = _orbit(np.array(point, dtype=float), rots, trans)
            species += [self.ions[role][0]] * len(images)
            coords += list(images)
        return Structure(lattice, species, coords)


def candidates(prototype: Prototype) -> list[Candidate]:
    """Every accepted composition of a prototype: distinct elements, one per (formula, prototype)."""
    seen: set[str] = set()
    out = []
    for family in prototype.families:
        roles = list(family)
        for elements in itertools.product(*(family[role][0] for role in roles)):
            if len(set(elements)) < len(elements):
                continue
            cand = Candidate(prototype, {role: (el, family[role][1]) for role, el in zip(roles, elements, strict=True)})
            if cand.reduced_formula in seen or not prototype.accept(cand.radii):
                continue
            seen.add(cand.reduced_formula)
            out.append(cand)
    return out


@dataclass(frozen=True)
class DemoEntry:
    """One demo crystal with the facts the CSV and the tests need."""

    material_id: str
    prototype: str
    structure: Structure
    oxidation_states: dict[str, int]  # element -> oxidation state

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def _balanced(pools: list[list[Candidate]], n: int) -> list[Candidate]:
    """Round robin over prototypes: the k-th pick of every prototype before any (k+1)-th."""
    ranked = sorted(((k, i, c) for i, pool in enumerate(pools) for k, c in enumerate(pool)), key=lambda t: t[:2])
    return [c for _, _, c in ranked[:n]]


def demo_entries(n: int = 200, seed: int = 0, prototypes: Sequence[str] | None = None) -> list[DemoEntry]:
    """``n`` distinct demo crystals, balanced over ``prototypes`` (default: all), the same for the same seed.

    Fewer prototypes make a more regular language: a small model learns it in fewer steps (the demo)."""
    names = list(PROTOTYPES) if prototypes is None else list(dict.fromkeys(prototypes))
    unknown = [name for name in names if name not in PROTOTYPES]
    if unknown or not names:
        raise ValueError(f"prototypes must be some of {', '.join(PROTOTYPES)}; got {', '.join(unknown) or 'none'}")
    pools = [candidates(PROTOTYPES[name]) for name in names]
    total = sum(map(len, pools))
    if not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and {total} (the number of distinct demo compositions), got {n}")
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    picked = _balanced(pools, n)
    rng.shuffle(picked)
    return [
        DemoEntry(
            material_id=f"{ID_PREFIX}{i:06d}",
            prototype=c.prototype.name,
            structure=c.structure(),
            oxidation_states={el: oxi for el, oxi in c.ions.values()},
        )
        for i, c in enumerate(picked)
    ]


def demo_structures(
    n: int = 200, seed: int = 0, prototypes: Sequence[str] | None = None
) -> list[tuple[str, Structure]]:
    """``(material_id, structure)`` pairs of :func:`demo_entries`."""
    return [(e.material_id, e.structure) for e in demo_entries(n, seed, prototypes)]


# ---------------------------------------------------------------- CSV and CLI


def _rows(entries: list[DemoEntry]) -> Iterator[tuple[str, str, str, str]]:
    from pymatgen.io.cif import CifWriter

    for e in entries:
        yield e.material_id, str(CifWriter(e.structure)), e.formula, e.prototype


def _write_rows(fh: TextIO, entries: list[DemoEntry]) -> None:
    writer = csv.writer(fh)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_rows(entries))


def write_demo_csv(path: str | Path, n: int = 200, seed: int = 0, prototypes: Sequence[str] | None = None) -> Path:
    """Write the demo set as CSV (gzip when the name ends in .gz); never overwrites a file.

    The gzip header carries no time stamp or name, so the same seed gives the same bytes.
    Raises FileExistsError if ``path`` exists and ValueError for an impossible ``n``.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists")
    entries = demo_entries(n, seed, prototypes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as raw:
        if path.name.endswith(".gz"):
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                io.TextIOWrapper(gz, encoding="utf-8", newline="") as fh,
            ):
                _write_rows(fh, entries)
        else:
            with io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
                _write_rows(fh, entries)
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write (.csv or .csv.gz); must not exist")
    parser.add_argument("--n", type=_positive_int, default=200, help="number of structures (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    parser.add_argument(
        "--prototypes",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        metavar="NAME,NAME",
        help=f"draw from these prototypes only (default: all of {', '.join(PROTOTYPES)})",
    )


def run(args: argparse.Namespace) -> int:
    try:
        path = write_demo_csv(args.out, n=args.n, seed=args.seed, prototypes=args.prototypes)
    except FileExistsError:
        print(f"crystallm demo-data: {args.out} already exists; refusing to overwrite it", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"crystallm demo-data: {exc}", file=sys.stderr)
        return 2
    with open_sink(path.parent) as sink:
        sink.artifact(path.resolve(), "data")
    print(f"wrote {args.n} demo structures to {path}")
    return 0
