from collections import Counter

import pytest
from pymatgen.core import Structure

from crystallm_core import spacegroups
from crystallm_core.cif import canonicalize
from crystallm_core.vocab import (
    VOCABS,
    VocabError,
    Vocabulary,
    check_vocab_id,
    cif_tokens,
    get_vocab,
    register_vocab,
    vocab_for_id,
)


def canon(rows):
    return [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in rows]


def test_roundtrip_is_exact_on_real_structures(perov_rows, carbon_rows):
    vocab = get_vocab()
    for text in canon(perov_rows) + canon(carbon_rows):
        unknown = Counter()
        ids = vocab.encode(text, unknown)
        assert not unknown
        assert vocab.decode(ids) == text


def test_vocabulary_covers_elements_and_space_groups():
    tokens = set(cif_tokens())
    for sym in ("H", "Pu", "Og", "<unk>"):
        assert sym in tokens
    assert len([t for t in tokens if t.startswith("<sg>")]) == 230


def test_space_group_pm_is_not_promethium():
    vocab = get_vocab()
    ids = vocab.encode("_symmetry_space_group_name_H-M Pm\n_atom Pm\n")
    sg_id = vocab.index["<sg>Pm"]
    el_id = vocab.index["Pm"]
    assert sg_id != el_id
    assert sg_id in ids and el_id in ids
    assert ids.index(sg_id) < ids.index(el_id)


def test_symops_loop_is_one_token_and_decodes_back():
    vocab = get_vocab()
    text = canonicalize(
        Structure.from_spacegroup(
            "Fm-3m", [[5.6, 0, 0], [0, 5.6, 0], [0, 0, 5.6]], ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
        )
    ).text
    assert text.count("\n") > 192
    ids = vocab.encode(text)
    assert ids.count(vocab.symops_id) == 1
    assert len(spacegroups.operations_xyz(225)) == 192
    assert vocab.decode(ids) == text


def test_unknown_content_is_counted_not_dropped():
    vocab = get_vocab()
    unknown = Counter()
    ids = vocab.encode("data_Na1Cl1\n#Q\n", unknown)
    assert unknown == Counter({"#": 1, "Q": 1})  # neither has a token; 'Q' is no element
    assert ids.count(vocab.unk_id) == sum(unknown.values())
    assert "<unk>" in vocab.decode(ids)


def test_vocab_id_mismatch_is_a_clear_error():
    vocab = get_vocab()
    assert vocab.id.startswith("cif-v1-")
    assert vocab_for_id(vocab.id) is vocab
    with pytest.raises(VocabError, match="cif-v1-000000000000"):
        vocab_for_id("cif-v1-000000000000")
    with pytest.raises(VocabError, match="was built with vocabulary"):
        check_vocab_id(vocab.id, "other-123", "data set /tmp/x")


def test_plugin_can_register_a_vocabulary():
    tokens = [*cif_tokens(), "<extra>"]
    register_vocab("test-extra", lambda: Vocabulary("test-extra", tokens), source="tests")
    try:
        v = get_vocab("test-extra")
        assert v.id != get_vocab().id and len(v) == len(get_vocab()) + 1
        assert v.encode("<extra>") == [v.index["<extra>"]]
    finally:
        VOCABS._entries.pop("test-extra")
