"""Readers of raw crystal structures: directories of .cif files, tarballs of them, and CSV tables.

Every reader yields :class:`Record` tuples ``(id, source, text, split)``; ``source`` is the input
path as the caller gave it and ``split`` is ``None`` unless a CSV ``split`` column supplied one.
Problems with an input as a whole (missing, of an unknown kind, a CSV without a ``cif`` column, a
bad ``split`` value) raise :class:`InputError` naming the path (and row); problems with one
structure are left to the caller, which parses the text.
"""

from __future__ import annotations

import csv
import gzip
import sys
import tarfile
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import NamedTuple, TextIO

SPLITS = ("train", "val", "test")
CIF_SUFFIX = ".cif"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CSV_SUFFIXES = (".csv", ".csv.gz")
ID_COLUMNS = ("material_id", "id")

# CIF texts in CSV cells can exceed the csv module's default field limit of 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class InputError(ValueError):
    """An input that cannot be read at all; the message names the path."""


class Record(NamedTuple):
    id: str
    source: str
    text: str
    split: str | None


def input_kind(path: str | Path) -> str:
    """'dir', 'tar' or 'csv'; raises InputError for a missing path or any other kind of file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file or directory")
    if p.is_dir():
        return "dir"
    name = p.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    kinds = ", ".join(("a directory of .cif files", *TAR_SUFFIXES, *CSV_SUFFIXES))
    raise InputError(f"{path}: unsupported input (expected {kinds})")


def read_input(path: str | Path) -> Iterator[Record]:
    """Records of one input; the input is checked now, its records are read lazily."""
    kind = input_kind(path)
    source = str(path)
    if kind == "dir":
        return _nonempty(_read_dir(Path(path), source), source)
    if kind == "tar":
        return _nonempty(_read_tar(Path(path), source), source)
    id_column, has_split = _csv_header(Path(path))
    return _nonempty(_read_csv(Path(path), source, id_column, has_split), source)


def read_inputs(paths: Iterable[str | Path]) -> Iterator[Record]:
    """Records of several inputs in order; every input is checked now, before any record is read."""
    readers = [read_input(p) for p in paths]
    if not readers:
        raise InputError("no inputs given")
    return chain.from_iterable(readers)


def _nonempty(records: Iterator[Record], source: str) -> Iterator[Record]:
    """Pass records through; an input that yields none is an error (a wrong path or pattern, usually)."""
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise InputError(f"{source}: holds no structures")


def _decode(data: bytes) -> str:
    """CIF files are ASCII in principle; older ones carry Latin-1 author names."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _strip_cif_suffix(name: str) -> str:
    return name[: -len(CIF_SUFFIX)] if name.lower().endswith(CIF_SUFFIX) else name


def _read_dir(root: Path, source: str) -> Iterator[Record]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(CIF_SUFFIX))
    for p in files:
        rel = p.relative_to(root).as_posix()
        yield Record(_strip_cif_suffix(rel), source, _decode(p.read_bytes()), None)


def _read_tar(path: Path, source: str) -> Iterator[Record]:
    try:
        with tarfile.open(path, "r|*") as tf:  # streaming: members are read in archive order, once
            for member in tf:
                if not (member.isfile() and member.name.lower().endswith(CIF_SUFFIX)):
                    continue
                fh = tf.extractfile(member)
                if fh is None:
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                yield Record(_strip_cif_suffix(name), source, _decode(fh.read()), None)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{source}: not a readable tar archive ({exc})") from None


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _csv_header(path: Path) -> tuple[str | None, bool]:
    """The id column (None: row numbers) and whether a split column exists; checks the cif column."""
    try:
        with _open_text(path) as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None
    if not header or "cif" not in header:
        found = ", ".join(repr(c) for c in header or []) or "none"
        raise InputError(f"{path}: CSV has no 'cif' column (columns: {found})")
    id_column = next((c for c in ID_COLUMNS if c in header), None)
    return id_column, "split" in header


def _read_csv(path: Path, source: str, id_column: str | None, has_split: bool) -> Iterator[Record]:
    """Rows as records; row numbers count data rows from 1 (the header is row 0)."""
    try:
        with _open_text(path) as fh:
            for row_number, row in enumerate(csv.DictReader(fh), 1):
                record_id = str(row_number) if id_column is None else (row.get(id_column) or "").strip()
                if not record_id:
                    raise InputError(f"{path}, row {row_number}: empty {id_column!r}")
                split = None
                if has_split:
                    split = (row.get("split") or "").strip()
                    if split not in SPLITS:
                        raise InputError(f"{path}, row {row_number}: split {split!r} is not one of {', '.join(SPLITS)}")
                yield Record(record_id, source, row.get("cif") or "", split)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from None
