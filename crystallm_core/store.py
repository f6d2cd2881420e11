"""The data-set store: every prepared structure, its canonical CIF and the facts to select it by.

One SQLite file, written through SQLAlchemy Core. Table ``structures`` holds one row per
structure; table ``elements`` holds one row per (structure, element) so that element filters
are indexed queries rather than string matching. The schema is documented in docs/DATA.md.

Selections are lists of ``FIELD=VALUE`` strings (:func:`parse_filters`), turned into bound-
parameter SQL; every filter must hold (AND).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    exists,
    func,
    insert,
    inspect,
    select,
    true,
    update,
)
from sqlalchemy.engine import URL
from sqlalchemy.sql.elements import ColumnElement

from crystallm_core.inputs import SPLITS

if TYPE_CHECKING:
    from crystallm_core.cif import Canonical


metadata = MetaData()
structures = Table(
    "structures",
    metadata,
    Column("id", String, primary_key=True),
    Column("source", String, nullable=False),
    Column("formula", String, nullable=False),
    Column("reduced_formula", String, nullable=False),
    Column("nsites", Integer, nullable=False),
    Column("spacegroup_number", Integer, nullable=False),
    Column("spacegroup_symbol", String, nullable=False),
    Column("volume", Float, nullable=False),
    Column("volume_per_fu", Float, nullable=False),
    Column("split", String, CheckConstraint("split IN ('train', 'val', 'test')", name="split_value")),
    Column("cif", Text, nullable=False),
    Index("ix_structures_formula_sg", "reduced_formula", "spacegroup_number"),
    Index("ix_structures_split", "split"),
)
elements = Table(
    "elements",
    metadata,
    Column("structure_id", String, ForeignKey("structures.id"), primary_key=True),
    Column("element", String, primary_key=True),
    Index("ix_elements_element", "element", "structure_id"),
)

_ELEMENT = re.compile(r"[A-Z][a-z]?")
_IN_BATCH = 500  # ids per IN (...) query, well under SQLite's limit on bound parameters


@dataclass(frozen=True)
class Row:
    """One stored structure."""

    id: str
    source: str
    formula: str  # cell formula, e.g. "Ba1 Ti1 O3"
    reduced_formula: str
    elements: tuple[str, ...]  # in the formula's order
    nsites: int
    spacegroup_number: int
    spacegroup_symbol: str
    volume: float
    volume_per_fu: float
    split: str | None
    cif: str

    @classmethod
    def from_canonical(cls, id: str, source: str, canonical: Canonical, split: str | None = None) -> Row:
        return cls(
            id=id,
            source=source,
            formula=canonical.formula,
            reduced_formula=canonical.reduced_formula,
            elements=canonical.elements,
            nsites=canonical.nsites,
            spacegroup_number=canonical.spacegroup_number,
            spacegroup_symbol=canonical.spacegroup_symbol,
            volume=canonical.volume,
            volume_per_fu=canonical.volume_per_formula_unit,
            split=split,
            cif=canonical.text,
        )


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class Filter:
    """One parsed ``FIELD=VALUE`` condition; ``value`` is normalized (see the parsers below)."""

    field: str
    value: tuple[Any, ...]
    text: str  # as given, for messages and meta.json

    def clause(self) -> ColumnElement[bool]:
        return _CLAUSES[self.field](self.value)


def _split_list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise ValueError("empty item in a comma-separated list")
    return items


def _parse_elements(value: str) -> tuple[str, ...]:
    from pymatgen.core import Element

    items = _split_list(value)
    unknown = [v for v in items if not Element.is_valid_symbol(v)]
    if unknown:
        raise ValueError(f"unknown element {', '.join(unknown)}")
    return tuple(dict.fromkeys(items))


def _parse_spacegroups(value: str) -> tuple[int, ...]:
    from crystallm_core import spacegroups

    numbers = []
    for item in _split_list(value):
        if item.isdigit():
            n = int(item)
            if not 1 <= n <= 230:
                raise ValueError(f"space-group number {n} is not in 1..230")
        else:
            found = spacegroups.number(item.replace(" ", ""))
            if found is None:
                raise ValueError(f"unknown space group {item!r} (give a number or a short symbol such as Pm-3m)")
            n = found
        numbers.append(n)
    return tuple(dict.fromkeys(numbers))


def _parse_range(value: str) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"\s*(\d*)\s*\.\.\s*(\d*)\s*", value)
    if m is None:
        if value.strip().isdigit():
            return int(value), int(value)
        raise ValueError(f"{value!r} is not N, LOW..HIGH, LOW.. or ..HIGH")
    low, high = (int(g) if g else None for g in m.groups())
    if low is None and high is None:
        raise ValueError("a range needs at least one end")
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty range {low}..{high}")
    return low, high


def _parse_split(value: str) -> tuple[str, ...]:
    items = _split_list(value)
    bad = [v for v in items if v not in SPLITS]
    if bad:
        raise ValueError(f"{', '.join(bad)} is not one of {', '.join(SPLITS)}")
    return tuple(dict.fromkeys(items))


def _composition(value: str):  # noqa: ANN202 (pymatgen Composition, imported lazily)
    from pymatgen.core import Composition, Element

    try:
        comp = Composition(value)
    except Exception as exc:  # pymatgen raises several types for bad formulas
        raise ValueError(f"{value!r} is not a chemical formula ({exc})") from None
    unknown = [getattr(sp, "symbol", str(sp)) for sp in comp if not isinstance(sp, Element)]
    if unknown:
        raise ValueError(f"unknown element {', '.join(unknown)}")
    return comp


def _parse_formula(value: str) -> tuple[str]:
    from crystallm_core.cif import cell_formula

    comp = _composition(value)
    if any(abs(n - round(n)) > 1e-8 for n in comp.values()):
        raise ValueError(f"{value!r} has non-integer counts")
    return (cell_formula(comp),)


def _parse_reduced_formula(value: str) -> tuple[str]:
    return (_composition(value).reduced_formula,)


def _parse_source(value: str) -> tuple[str]:
    if not value:
        raise ValueError("empty source")
    return (value,)


def _has_element(el: str) -> ColumnElement[bool]:
    return exists().where(elements.c.structure_id == structures.c.id, elements.c.element == el)


def _range_clause(value: tuple[Any, ...]) -> ColumnElement[bool]:
    low, high = value
    clause: ColumnElement[bool] = true()
    if low is not None:
        clause = clause & (structures.c.nsites >= low)
    if high is not None:
        clause = clause & (structures.c.nsites <= high)
    return clause


_PARSERS: dict[str, Callable[[str], tuple[Any, ...]]] = {
    "elements": _parse_elements,
    "exclude_elements": _parse_elements,
    "spacegroup": _parse_spacegroups,
    "nsites": _parse_range,
    "split": _parse_split,
    "source": _parse_source,
    "formula": _parse_formula,
    "reduced_formula": _parse_reduced_formula,
}
_CLAUSES: dict[str, Callable[[tuple[Any, ...]], ColumnElement[bool]]] = {
    "elements": lambda v: _and(_has_element(el) for el in v),
    "exclude_elements": lambda v: (
        ~exists().where(elements.c.structure_id == structures.c.id, elements.c.element.in_(v))
    ),
    "spacegroup": lambda v: structures.c.spacegroup_number.in_(v),
    "nsites": _range_clause,
    "split": lambda v: structures.c.split.in_(v),
    "source": lambda v: structures.c.source == v[0],
    "formula": lambda v: structures.c.formula == v[0],
    "reduced_formula": lambda v: structures.c.reduced_formula == v[0],
}
FIELDS = tuple(_PARSERS)


def _and(clauses: Iterable[ColumnElement[bool]]) -> ColumnElement[bool]:
    out: ColumnElement[bool] = true()
    for c in clauses:
        out = out & c
    return out


def parse_filter(text: str) -> Filter:
    """One ``FIELD=VALUE`` string; ValueError names the filter and lists the valid fields."""
    valid = f"valid fields: {', '.join(FIELDS)}"
    field, sep, value = text.partition("=")
    field = field.strip()
    if not sep:
        raise ValueError(f"filter {text!r} is not FIELD=VALUE; {valid}")
    if field not in _PARSERS:
        raise ValueError(f"unknown filter field {field!r} in {text!r}; {valid}")
    try:
        parsed = _PARSERS[field](value.strip())
    except ValueError as exc:
        raise ValueError(f"filter {text!r}: bad value for {field}: {exc}; {valid}") from None
    return Filter(field, parsed, text)


def parse_filters(texts: Sequence[str]) -> list[Filter]:
    return [parse_filter(t) for t in texts]


# ---------------------------------------------------------------- store


def _url(path: Path) -> URL:
    return URL.create("sqlite", database=str(path))


def _row(m: Any) -> Row:
    return Row(
        id=m.id,
        source=m.source,
        formula=m.formula,
        reduced_formula=m.reduced_formula,
        elements=tuple(_ELEMENT.findall(m.formula)),
        nsites=m.nsites,
        spacegroup_number=m.spacegroup_number,
        spacegroup_symbol=m.spacegroup_symbol,
        volume=m.volume,
        volume_per_fu=m.volume_per_fu,
        split=m.split,
        cif=m.cif,
    )


class Store:
    """A data-set store file; use :meth:`create` or :meth:`open`, and :meth:`close` (or ``with``)."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path

    @classmethod
    def create(cls, path: str | Path) -> Store:
        """A new, empty store; refuses an existing file."""
        p = Path(path)
        if p.exists():
            raise FileExistsError(f"{p}: already exists; a store is never overwritten")
        engine = create_engine(_url(p))
        metadata.create_all(engine)
        return cls(engine, p)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such store")
        engine = create_engine(_url(p))
        try:
            tables = set(inspect(engine).get_table_names())
        except Exception as exc:  # a file that is not SQLite
            engine.dispose()
            raise ValueError(f"{p}: not a data-set store ({exc})") from None
        if not {"structures", "elements"} <= tables:
            engine.dispose()
            raise ValueError(f"{p}: not a data-set store (tables: {', '.join(sorted(tables)) or 'none'})")
        return cls(engine, p)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_many(self, rows: Iterable[Row]) -> int:
        """Insert rows in one transaction; an id already stored is a ValueError and nothing is added."""
        rows = list(rows)
        if not rows:
            return 0
        ids = [r.id for r in rows]
        repeated = next((i for i, n in Counter(ids).items() if n > 1), None)
        if repeated is not None:
            raise ValueError(f"structure id {repeated!r} appears twice in one batch")
        values = [{f.name: getattr(r, f.name) for f in fields(Row) if f.name != "elements"} for r in rows]
        element_values = [{"structure_id": r.id, "element": el} for r in rows for el in r.elements]
        with self.engine.begin() as conn:
            for k in range(0, len(ids), _IN_BATCH):
                query = select(structures.c.id).where(structures.c.id.in_(ids[k : k + _IN_BATCH])).limit(1)
                taken = conn.execute(query).scalar()
                if taken is not None:
                    raise ValueError(f"structure id {taken!r} is already stored")
            conn.execute(insert(structures), values)
            if element_values:
                conn.execute(insert(elements), element_values)
        return len(rows)

    def _where(self, filters: Sequence[Filter]) -> ColumnElement[bool]:
        return _and(f.clause() for f in filters)

    def iter_rows(self, filters: Sequence[Filter] = (), batch: int = 1000) -> Iterator[Row]:
        """Matching rows in id order, fetched ``batch`` at a time."""
        query = select(structures).where(self._where(filters)).order_by(structures.c.id)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=batch).execute(query)
            for m in result:
                yield _row(m)

    def select(self, filters: Sequence[Filter] = ()) -> list[Row]:
        return list(self.iter_rows(filters))

    def count(self, filters: Sequence[Filter] = ()) -> int:
        query = select(func.count()).select_from(structures).where(self._where(filters))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def ids(self) -> list[str]:
        """All stored ids, sorted."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(structures.c.id).order_by(structures.c.id)).scalars())

    def unsplit_count(self) -> int:
        """How many stored structures have no split yet."""
        query = select(func.count()).select_from(structures).where(structures.c.split.is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def set_splits(self, assignment: Iterable[tuple[str, str]]) -> None:
        """Set the split of each (id, split) pair, in one transaction."""
        stmt = update(structures).where(structures.c.id == bindparam("sid")).values(split=bindparam("new_split"))
        params = [{"sid": i, "new_split": s} for i, s in assignment]
        if params:
            with self.engine.begin() as conn:
                conn.execute(stmt, params)

    def remove_duplicates(self) -> list[tuple[str, str]]:
        """Keep one structure per (reduced formula, space group): smallest volume per formula unit, then id.

        Returns (removed id, kept id) pairs.
        """
        group = (structures.c.reduced_formula, structures.c.spacegroup_number)
        order = (structures.c.volume_per_fu, structures.c.id)
        ranked = select(
            structures.c.id,
            func.row_number().over(partition_by=group, order_by=order).label("rank"),
            func.first_value(structures.c.id).over(partition_by=group, order_by=order).label("kept"),
        ).subquery()
        query = select(ranked.c.id, ranked.c.kept).where(ranked.c.rank > 1).order_by(ranked.c.id)
        with self.engine.begin() as conn:
            pairs = [(r.id, r.kept) for r in conn.execute(query)]
            if pairs:
                gone = [{"sid": removed} for removed, _ in pairs]
                conn.execute(delete(elements).where(elements.c.structure_id == bindparam("sid")), gone)
                conn.execute(delete(structures).where(structures.c.id == bindparam("sid")), gone)
        return pairs
