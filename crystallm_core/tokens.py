"""Token files of a prepared data set, the format the trainer reads (documented in docs/DATA.md).

For each split with at least one CIF:

* ``{split}.bin``: uint16 token ids, native little-endian, each CIF followed by ``<eos>``;
* ``{split}.starts.npy``: int64 offset of each CIF's first token in ``{split}.bin``.

``meta.json`` beside them names the vocabulary id and the counts. :class:`TokenData` reads a split
back through memory maps and refuses a vocabulary other than the one the files were written with.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crystallm_core.inputs import SPLITS
from crystallm_core.vocab import Vocabulary, check_vocab_id, get_vocab

META = "meta.json"
TOKEN_DTYPE = np.dtype("<u2")
START_DTYPE = np.dtype("<i8")


def bin_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.bin"


def starts_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.starts.npy"


@dataclass(frozen=True)
class SplitCounts:
    cifs: int
    tokens: int  # <eos> included


def write_split(
    directory: str | Path, split: str, texts: Iterable[str], vocab: Vocabulary, unknown: Counter | None = None
) -> SplitCounts:
    """Encode ``texts`` into the split's token files; writes no file when ``texts`` is empty.

    Characters the vocabulary does not cover are counted in ``unknown``.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    starts: list[int] = []
    offset = 0
    fh = None
    try:
        for text in texts:
            ids = vocab.encode(text, unknown)
            ids.append(vocab.eos_id)
            if fh is None:
                fh = bin_path(directory, split).open("xb")
            fh.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
            starts.append(offset)
            offset += len(ids)
    finally:
        if fh is not None:
            fh.close()
    if starts:
        with starts_path(directory, split).open("xb") as out:
            np.save(out, np.asarray(starts, dtype=START_DTYPE))
    return SplitCounts(cifs=len(starts), tokens=offset)


def write_meta(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically, so that a reader never sees half of it."""
    path = Path(directory) / META
    tmp = path.with_name(META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; {directory} is not a prepared data set") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


class TokenData:
    """One split of a prepared data set, memory-mapped.

    ``tokens`` is the whole uint16 stream, ``starts`` the offset of each CIF; :meth:`cif` gives
    the tokens of one CIF without its ``<eos>``.
    """

    def __init__(self, directory: str | Path, split: str, vocab: Vocabulary | str) -> None:
        self.directory = Path(directory)
        self.split = split
        self.vocab = get_vocab(vocab) if isinstance(vocab, str) else vocab
        self.meta = read_meta(self.directory)
        check_vocab_id(self.vocab.id, self.meta.get("vocab_id", "<none>"), f"data set {self.directory}")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        counts = self.meta["splits"][split]
        if counts["cifs"] == 0:
            raise ValueError(f"{self.directory}: split {split!r} holds no CIFs (there is no {split}.bin)")
        self.tokens = np.memmap(bin_path(self.directory, split), dtype=TOKEN_DTYPE, mode="r")
        self.starts = np.load(starts_path(self.directory, split), mmap_mode="r")
        if len(self.tokens) != counts["tokens"] or len(self.starts) != counts["cifs"]:
            raise ValueError(
                f"{self.directory}: {split} files hold {len(self.starts)} CIFs / {len(self.tokens)} tokens, "
                f"meta.json says {counts['cifs']} / {counts['tokens']}"
            )

    def __len__(self) -> int:
        return len(self.starts)

    def cif(self, i: int) -> np.ndarray:
        """Token ids of CIF ``i`` (a view into the memory map), without its ``<eos>``."""
        n = len(self.starts)
        if not -n <= i < n:
            raise IndexError(f"CIF {i} out of range: {self.split} holds {n}")
        i %= n
        end = int(self.starts[i + 1]) if i + 1 < n else len(self.tokens)
        return self.tokens[int(self.starts[i]) : end - 1]

    def iter_cifs(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.cif(i)

    def decode(self, i: int) -> str:
        return self.vocab.decode(self.cif(i))
