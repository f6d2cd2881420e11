from collections import Counter

import numpy as np
import pytest
from pymatgen.core import Structure

from crystallm_core.cif import canonicalize
from crystallm_core.tokens import (
    TokenData,
    bin_path,
    read_meta,
    starts_path,
    write_meta,
    write_split,
)
from crystallm_core.vocab import VocabError, Vocabulary, cif_tokens, get_vocab


@pytest.fixture(scope="module")
def texts(perov_rows):
    return [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in perov_rows[:25]]


def prepared(directory, texts, vocab, split="train"):
    counts = write_split(directory, split, texts, vocab)
    write_meta(
        directory,
        {
            "vocab_id": vocab.id,
            "splits": {s: {"cifs": 0, "tokens": 0} for s in ("train", "val", "test")}
            | {split: {"cifs": counts.cifs, "tokens": counts.tokens}},
        },
    )
    return counts


def test_files_hold_uint16_tokens_each_cif_ending_in_eos(tmp_path, texts):
    vocab = get_vocab()
    counts = prepared(tmp_path, texts, vocab)
    raw = np.fromfile(bin_path(tmp_path, "train"), dtype=np.uint16)
    starts = np.load(starts_path(tmp_path, "train"))
    assert starts.dtype == np.int64 and len(starts) == counts.cifs == len(texts)
    assert len(raw) == counts.tokens
    expected = [vocab.encode(t) + [vocab.eos_id] for t in texts]
    assert raw.tolist() == [i for ids in expected for i in ids]
    assert starts.tolist() == np.cumsum([0] + [len(e) for e in expected[:-1]]).tolist()
    assert (raw == vocab.eos_id).sum() == len(texts)


def test_token_data_decodes_every_cif_exactly(tmp_path, texts):
    vocab = get_vocab()
    prepared(tmp_path, texts, vocab)
    data = TokenData(tmp_path, "train", vocab)
    assert len(data) == len(texts)
    assert [data.decode(i) for i in range(len(data))] == texts
    cifs = list(data.iter_cifs())
    assert all(vocab.eos_id not in c for c in cifs)
    assert data.cif(-1).tolist() == cifs[-1].tolist() == vocab.encode(texts[-1])
    with pytest.raises(IndexError, match="out of range"):
        data.cif(len(texts))


def test_another_vocabulary_is_refused(tmp_path, texts):
    prepared(tmp_path, texts, get_vocab())
    other = Vocabulary("cif-v1", [*cif_tokens(), "<extra>"])
    with pytest.raises(VocabError, match=get_vocab().id):
        TokenData(tmp_path, "train", other)


def test_empty_split_writes_no_files_and_cannot_be_read(tmp_path, texts):
    vocab = get_vocab()
    prepared(tmp_path, texts[:3], vocab)
    assert write_split(tmp_path, "val", [], vocab).cifs == 0
    assert not bin_path(tmp_path, "val").exists() and not starts_path(tmp_path, "val").exists()
    with pytest.raises(ValueError, match="split 'val' holds no CIFs"):
        TokenData(tmp_path, "val", vocab)


def test_unknown_characters_are_counted(tmp_path):
    vocab = get_vocab()
    unknown = Counter()
    counts = write_split(tmp_path, "test", ["data_Na1\n#é\n"], vocab, unknown)
    assert unknown == Counter({"#": 1, "é": 1})
    assert counts.cifs == 1


def test_meta_and_files_must_agree(tmp_path, texts):
    vocab = get_vocab()
    prepared(tmp_path, texts[:4], vocab)
    meta = read_meta(tmp_path)
    meta["splits"]["train"]["tokens"] += 1
    write_meta(tmp_path, meta)
    with pytest.raises(ValueError, match="meta.json says"):
        TokenData(tmp_path, "train", vocab)
    with pytest.raises(FileNotFoundError, match="not a prepared data set"):
        TokenData(tmp_path / "nowhere", "train", vocab)


def test_files_are_never_overwritten(tmp_path, texts):
    vocab = get_vocab()
    prepared(tmp_path, texts[:2], vocab)
    with pytest.raises(FileExistsError):
        write_split(tmp_path, "train", texts[2:4], vocab)
