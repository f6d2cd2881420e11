"""Training-set augmentation: equivalent texts of real carbon_24 and perov_5 crystals, and ``prepare --augment``."""

import csv
import json
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystallm_core import augment, cli, validity
from crystallm_core.augment import AUGMENT_MAX, origin_shifts, variants
from crystallm_core.cif import canonicalize, expand, parse_structure, read_cif
from crystallm_core.prepare import PrepareError, prepare
from crystallm_core.tokens import SPLITS, TokenData, bin_path, read_meta, starts_path
from crystallm_core.vocab import get_vocab


def canonical(row: dict[str, str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return canonicalize(Structure.from_str(row["cif"], fmt="cif")).text


def one_per_spacegroup(rows: list[dict[str, str]], n: int) -> list[tuple[str, str]]:
    """(id, canonical CIF) of the first ``n`` rows of distinct space groups: the variety of settings."""
    seen, out = set(), []
    for row in rows:
        text = canonical(row)
        sg = read_cif(text).tags["_symmetry_Int_Tables_number"]
        if sg not in seen:
            seen.add(sg)
            out.append((row["material_id"], text))
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def crystals(carbon_rows, perov_rows) -> list[tuple[str, str]]:
    return one_per_spacegroup(carbon_rows, 8) + one_per_spacegroup(perov_rows, 2)


def test_variants_are_new_texts_of_the_same_valid_crystal(crystals):
    vocab = get_vocab()
    matcher = StructureMatcher()
    assert len({read_cif(t).tags["_symmetry_Int_Tables_number"] for _, t in crystals}) >= 8
    for key, text in crystals:
        found = variants(text, 3, 0, key, 4, 0.1)
        assert len(found.texts) == 3 and found.failed == 0, key
        assert len({text, *found.texts}) == 4, key  # new, and new to each other
        original = parse_structure(text)
        assert validity.check(text).is_valid, key
        head = text.split("_atom_site_occupancy\n")[0]
        for variant in found.texts:
            assert variant.startswith(head)  # only the atom-site rows change
            assert matcher.fit(original, parse_structure(variant)), (key, variant)
            verdict = validity.check(variant)
            assert verdict.is_valid, (key, verdict.reasons)
            unknown: Counter = Counter()
            assert vocab.decode(vocab.encode(variant, unknown)) == variant and not unknown


def test_rows_of_one_element_stay_together_in_canonical_element_order(perov_rows):
    key, text = one_per_spacegroup(perov_rows, 1)[0]
    found = variants(text, 4, 1, key, 4, 0.1)

    def elements(t: str) -> list[str]:
        return read_cif(t).loop_with("_atom_site_fract_x")["_atom_site_type_symbol"]

    for variant in found.texts:
        assert elements(variant) == elements(text)
        labels = read_cif(variant).loop_with("_atom_site_fract_x")["_atom_site_label"]
        assert labels == [f"{el}{k}" for k, el in enumerate(elements(text))]


def test_origin_shifts_are_the_translations_that_keep_the_operators():
    assert sorted(map(tuple, origin_shifts(221))) == [(0, 0, 0), (0.5, 0.5, 0.5)]  # Pm-3m: 1a <-> 1b
    assert len(origin_shifts(2)) == 8  # P-1: the eight inversion centres
    assert len(origin_shifts(1)) == augment.SHIFT_GRID**3  # P1: any origin
    assert sorted(map(tuple, origin_shifts(194))) == [(0, 0, 0), (0, 0, 0.5)]  # P6_3/mmc


def test_a_variant_that_is_not_the_same_crystal_is_skipped_and_counted(crystals, monkeypatch):
    # Moving the origin of C2/m by (1/4, 0, 0) moves its inversion centres off the lattice of C-centred
    # translations: such a text names a group its atoms do not have, so every draw must fail the check.
    monkeypatch.setattr(augment, "origin_shifts", lambda sg: np.array([[0.25, 0.0, 0.0]]))
    key, text = next((k, t) for k, t in crystals if read_cif(t).tags["_symmetry_Int_Tables_number"] == "12")
    found = variants(text, 2, 0, key, 4, 0.1)
    assert found.texts == [] and found.failed > 0


def test_same_crystal_tells_a_moved_atom():
    text = canonicalize(Structure.from_str(DIAMOND, fmt="cif")).text
    cell = expand(read_cif(text))
    frac = cell.frac.copy()
    frac[3, 0] += 0.01  # one atom of eight, 0.036 Å away
    moved = replace(cell, frac=frac)
    assert augment.same_crystal(cell, cell, 1e-3)
    assert not augment.same_crystal(cell, moved, 1e-3)


def test_variants_depend_on_seed_and_id_only(crystals):
    key, text = crystals[0]
    assert variants(text, 3, 7, key, 4, 0.1) == variants(text, 3, 7, key, 4, 0.1)
    assert variants(text, 3, 8, key, 4, 0.1).texts != variants(text, 3, 7, key, 4, 0.1).texts


DIAMOND = """data_C
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a 2.5221
_cell_length_b 2.5221
_cell_length_c 2.5221
_cell_angle_alpha 60
_cell_angle_beta 60
_cell_angle_gamma 60
_symmetry_Int_Tables_number 1
loop_
_symmetry_equiv_pos_as_xyz
'x, y, z'
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
C C0 0 0 0 1
C C1 0.25 0.25 0.25 1
"""


# ---------------------------------------------------------------- prepare --augment


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif"])
        w.writerows([r["material_id"], r["cif"]] for r in rows)
    return path


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for s in SPLITS for p in (bin_path(out, s), starts_path(out, s)) if p.exists()}


def test_prepare_augment_triples_train_only_and_is_reproducible(tmp_path, carbon_rows):
    src = write_csv(tmp_path / "carbon.csv", carbon_rows[:40])
    plain = prepare([src], tmp_path / "plain", workers=2)
    aug = prepare([src], tmp_path / "aug", workers=2, augment=2)
    prepare([src], tmp_path / "again", workers=1, augment=2)  # other scheduling, same files
    other = prepare([src], tmp_path / "other", workers=2, augment=2, seed=1)

    train = plain.splits["train"].cifs
    assert aug.variants == 2 * train and aug.variant_failures == 0
    assert aug.splits["train"].cifs == 3 * train and aug.selected == plain.selected == 40
    assert aug.splits["val"] == plain.splits["val"] and aug.splits["test"] == plain.splits["test"]
    for name in ("val.bin", "val.starts.npy", "test.bin", "test.starts.npy"):
        assert files(tmp_path / "aug")[name] == files(tmp_path / "plain")[name]
    assert files(tmp_path / "again") == files(tmp_path / "aug")
    assert files(tmp_path / "other")["train.bin"] != files(tmp_path / "aug")["train.bin"]
    assert other.splits["val"] != aug.splits["val"] or other.splits["test"] != aug.splits["test"]  # seed splits too

    meta = read_meta(tmp_path / "aug")
    selection = json.loads((tmp_path / "aug" / "selection.json").read_text())
    assert meta["augment"] == selection["augment"] == 2 and read_meta(tmp_path / "plain")["augment"] == 0
    assert meta["counts"]["variants"] == 2 * train and meta["counts"]["variant_failures"] == 0
    plain_selection = json.loads((tmp_path / "plain" / "selection.json").read_text())
    ids = selection["selected"]["train"]
    assert ids == [i for i in plain_selection["selected"]["train"] for _ in range(3)]  # CIF i is ids[i]
    assert selection["selected"]["val"] == plain_selection["selected"]["val"]

    data, canon = TokenData(tmp_path / "aug", "train", get_vocab()), TokenData(tmp_path / "plain", "train", get_vocab())
    for i in range(train):  # each structure's canonical CIF, then its two variants
        texts = [data.decode(3 * i + j) for j in range(3)]
        assert texts[0] == canon.decode(i) and len(set(texts)) == 3
    assert f"train variants         {2 * train} of {2 * train}  (--augment 2)" in aug.summary()


@pytest.mark.parametrize("k", [-1, AUGMENT_MAX + 1])
def test_augment_out_of_bounds_is_refused(tmp_path, carbon_rows, k):
    src = write_csv(tmp_path / "carbon.csv", carbon_rows[:2])
    with pytest.raises(PrepareError, match=f"augment must be between 0 and {AUGMENT_MAX}, got {k}"):
        prepare([src], tmp_path / "out", augment=k)
    assert not (tmp_path / "out").exists()


def test_cli_augment_flag(tmp_path, carbon_rows, capsys):
    src = write_csv(tmp_path / "carbon.csv", carbon_rows[:10])
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "bad"), "--augment", "99"]) == 2
    assert "augment must be between 0 and 16, got 99" in capsys.readouterr().err
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "out"), "--augment", "1", "--workers", "1"]) == 0
    assert "train variants         8 of 8  (--augment 1)" in capsys.readouterr().out
    assert read_meta(tmp_path / "out")["splits"]["train"]["cifs"] == 16
