"""CIF tokenizer.

A vocabulary is an ordered list of token strings. Encoding is greedy longest match
with two pieces of context that plain matching cannot express:

* the value after ``_symmetry_space_group_name_H-M`` is matched against the 230
  space-group tokens, which are separate ids from element symbols and digits (the
  space group ``Pm`` is not promethium);
* a symmetry-operator loop that is exactly the loop of the space group just written
  becomes the single token ``<symops>``; decoding writes the operators back from
  that space group, so canonical CIFs cost one token for 1 to 192 operators.

Anything that no token covers becomes ``<unk>`` (one per character) and is counted
by the caller-supplied counter. The vocabulary id is ``name-<12 hex of sha256 of
the token list>``; data sets and checkpoints store it and loaders compare it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property

from pymatgen.core.periodic_table import Element

from crystallm_core import spacegroups
from crystallm_core.cif import (
    CELL_TAGS,
    PROPS_HEADER,
    SITES_HEADER,
    SYMOPS_HEADER,
    TAG_FORMULA_STRUCTURAL,
    TAG_FORMULA_SUM,
    TAG_SG_NUMBER,
    TAG_SG_SYMBOL,
    TAG_VOLUME,
    TAG_Z,
    symops_block,
)
from crystallm_core.registry import Registry

PAD, UNK, EOS, SYMOPS = "<pad>", "<unk>", "<eos>", "<symops>"
SPECIALS = (PAD, UNK, EOS, SYMOPS)
SG_PREFIX = "<sg>"  # how space-group tokens are named in the token list (decoded without it)


class VocabError(ValueError):
    """Raised when data, prompts or models disagree about the vocabulary."""


class Vocabulary:
    def __init__(self, name: str, tokens: Sequence[str]) -> None:
        if len(set(tokens)) != len(tokens):
            raise VocabError(f"vocabulary {name!r} has duplicate tokens")
        if len(tokens) > 65535:
            raise VocabError("vocabulary must fit uint16 token files")
        missing = [s for s in SPECIALS if s not in tokens]
        if missing:
            raise VocabError(f"vocabulary {name!r} lacks {missing}")
        self.name = name
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.eos_id, self.symops_id = (self.index[s] for s in SPECIALS)
        self._sg_tag_id = self.index.get(TAG_SG_SYMBOL + " ")
        self._sg_ids = {t[len(SG_PREFIX) :]: i for t, i in self.index.items() if t.startswith(SG_PREFIX)}
        self._sg_number_of_id = {i: spacegroups.number(s) for s, i in self._sg_ids.items()}
        general = [t for t in self.tokens if t not in SPECIALS and not t.startswith(SG_PREFIX)]
        self._general = re.compile("|".join(re.escape(t) for t in sorted(general, key=len, reverse=True)))
        self._sg_value = re.compile(r"[^\s]+(?=\n|$)")

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"

    def text_of(self, token_id: int) -> str:
        t = self.tokens[token_id]
        return t[len(SG_PREFIX) :] if t.startswith(SG_PREFIX) else t

    def encode(self, text: str, unknown: Counter | None = None) -> list[int]:
        """Token ids of ``text``; characters no token covers become <unk> and are counted in ``unknown``."""
        ids: list[int] = []
        pos, n = 0, len(text)
        sg_number: int | None = None
        while pos < n:
            if ids and ids[-1] == self._sg_tag_id:
                m = self._sg_value.match(text, pos)
                if m and m.group(0) in self._sg_ids:
                    ids.append(self._sg_ids[m.group(0)])
                    sg_number = spacegroups.number(m.group(0))
                    pos = m.end()
                    continue
            if sg_number is not None and text.startswith(SYMOPS_HEADER, pos):
                block = symops_block(sg_number)
                if text.startswith(block, pos):
                    ids.append(self.symops_id)
                    pos += len(block)
                    continue
            m = self._general.match(text, pos)
            if m:
                ids.append(self.index[m.group(0)])
                pos = m.end()
            else:
                ids.append(self.unk_id)
                if unknown is not None:
                    unknown[text[pos]] += 1
                pos += 1
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: <pad> and <eos> write nothing; <symops> writes the operators of the last space group."""
        out: list[str] = []
        sg_number: int | None = None
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.eos_id):
                continue
            if i == self.symops_id:
                out.append(symops_block(sg_number) if sg_number else SYMOPS_HEADER + "1 'x, y, z'\n")
                continue
            if i in self._sg_number_of_id:
                sg_number = self._sg_number_of_id[i]
            out.append(self.text_of(i))
        return "".join(out)


def check_vocab_id(expected: str, found: str, what: str) -> None:
    """Refuse to combine artifacts built with different vocabularies."""
    if expected != found:
        raise VocabError(f"{what} was built with vocabulary {found!r}, but {expected!r} is in use")


def cif_tokens() -> list[str]:
    """Token list of the built-in ``cif-v1`` vocabulary."""
    tags = [
        "data_",
        TAG_SG_SYMBOL + " ",
        TAG_SG_NUMBER + " ",
        *(t + " " for t in CELL_TAGS),
        TAG_VOLUME + " ",
        TAG_Z + " ",
        TAG_FORMULA_STRUCTURAL + " ",
        TAG_FORMULA_SUM + " '",
        SYMOPS_HEADER,
        PROPS_HEADER,
        SITES_HEADER,
    ]
    elements = [el.symbol for el in Element]
    punctuation = list("0123456789.-+/ \n',xyz")
    sgs = [SG_PREFIX + s for s in spacegroups.symbols()]
    return [*SPECIALS, *tags, *elements, *punctuation, *sgs]


VOCABS: Registry[Callable[[], Vocabulary]] = Registry("vocabulary")
_cache: dict[str, Vocabulary] = {}


def register_vocab(name: str, factory: Callable[[], Vocabulary], *, source: str = "") -> None:
    VOCABS.register(name, factory, source=source)


def get_vocab(name: str = "cif-v1") -> Vocabulary:
    if name not in _cache:
        vocab = VOCABS.get(name)()
        if vocab.name != name:
            raise VocabError(f"vocabulary factory {name!r} built a vocabulary named {vocab.name!r}")
        _cache[name] = vocab
    return _cache[name]


def vocab_for_id(vocab_id: str) -> Vocabulary:
    """The registered vocabulary whose id is ``vocab_id`` (name and token hash both match)."""
    name = vocab_id.rsplit("-", 1)[0]
    vocab = get_vocab(name)
    check_vocab_id(vocab.id, vocab_id, f"vocabulary {name!r}")
    return vocab


register_vocab("cif-v1", lambda: Vocabulary("cif-v1", cif_tokens()), source=__name__)
