"""The built-in demo data set: deterministic, balanced, canonicalizable, physically sensible."""

from __future__ import annotations

import csv
import gzip
import warnings
from collections import Counter

import numpy as np
import pytest
from pymatgen.core import Species, Structure

from crystallm_core import demo
from crystallm_core.cif import Canonical, canonicalize
from crystallm_core.cli import main
from crystallm_core.events import ENV_VAR, read_events
from crystallm_core.validity import check


@pytest.fixture(scope="module")
def entries() -> list[demo.DemoEntry]:
    return demo.demo_entries(200, seed=0)


@pytest.fixture(scope="module")
def canonical(entries) -> list[Canonical]:
    return [canonicalize(e.structure) for e in entries]


def _fingerprint(entries: list[demo.DemoEntry]) -> list[tuple[str, str, str, tuple[float, ...]]]:
    return [(e.material_id, e.prototype, e.formula, tuple(e.structure.lattice.abc)) for e in entries]


def test_same_seed_gives_same_set_and_other_seed_another():
    first = demo.demo_entries(40, seed=7)
    assert _fingerprint(first) == _fingerprint(demo.demo_entries(40, seed=7))
    assert {e.formula for e in first} != {e.formula for e in demo.demo_entries(40, seed=8)}
    assert demo.demo_structures(40, seed=7)[3][1] == first[3].structure


def test_count_ids_and_unique_compositions(entries):
    assert len(entries) == 200
    assert [e.material_id for e in entries] == [f"demo-{i:06d}" for i in range(200)]
    pairs = [(e.structure.composition.reduced_composition, e.prototype) for e in entries]
    assert len(set(pairs)) == len(pairs)


def test_prototypes_are_balanced(entries):
    counts = Counter(e.prototype for e in entries)
    assert set(counts) == set(demo.PROTOTYPES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_subset_of_prototypes_is_balanced_over_those_only():
    chosen = demo.demo_entries(30, seed=0, prototypes=["cscl", "rocksalt", "cscl"])
    counts = Counter(e.prototype for e in chosen)
    assert counts == {"rocksalt": 15, "cscl": 15}
    every_cscl = len(demo.candidates(demo.PROTOTYPES["cscl"]))
    with pytest.raises(ValueError, match="prototypes must be some of rocksalt, .*; got perovskit"):
        demo.demo_entries(5, prototypes=["rocksalt", "perovskit"])
    with pytest.raises(ValueError, match=f"n must be between 1 and {every_cscl} "):
        demo.demo_entries(every_cscl + 1, prototypes=["cscl"])


def test_impossible_sizes_are_refused():
    total = sum(len(demo.candidates(p)) for p in demo.PROTOTYPES.values())
    assert len(demo.demo_entries(total)) == total
    for n in (0, total + 1):
        with pytest.raises(ValueError, match="n must be between"):
            demo.demo_entries(n)


def test_every_structure_canonicalizes_to_its_prototype_space_group(entries, canonical):
    for e, canon in zip(entries, canonical, strict=True):
        assert canon.spacegroup_number == demo.PROTOTYPES[e.prototype].spacegroup, (e.prototype, e.formula)
        assert canon.reduced_formula == e.formula


def test_canonical_demo_cifs_pass_the_validity_checks(entries, canonical):
    """Half the set (shuffled, so every prototype is in it) keeps the test fast."""
    verdicts = [(e, check(c.text)) for e, c in zip(entries[:100], canonical[:100], strict=True)]
    failed = [(e.prototype, e.formula, v.reasons) for e, v in verdicts if not v.is_valid]
    assert len(failed) <= 2, failed


def _ionic_radii(entry: demo.DemoEntry) -> np.ndarray:
    with warnings.catch_warnings():  # pymatgen warns which spin it picked for some ions
        warnings.simplefilter("ignore", UserWarning)
        radii = {el: Species(el, oxi).ionic_radius for el, oxi in entry.oxidation_states.items()}
    return np.array([float(radii[site.specie.symbol]) for site in entry.structure])


def test_no_atoms_closer_than_three_quarters_of_the_ionic_radii_sum(entries):
    for e in entries:
        radii = _ionic_radii(e)
        dist = e.structure.distance_matrix + np.eye(len(radii)) * 1e3
        ratio = dist / (radii[:, None] + radii[None, :])
        assert ratio.min() >= 0.75, (e.prototype, e.formula, ratio.min())


def test_every_cation_touches_an_anion(entries):
    """Nearest anion within 1.25x the radii sum: no cation rattles in an oversized cell."""
    for e in entries:
        radii = _ionic_radii(e)
        charge = np.array([e.oxidation_states[site.specie.symbol] for site in e.structure])
        dist = e.structure.distance_matrix[charge > 0][:, charge < 0]
        ratio = dist / (radii[charge > 0][:, None] + radii[charge < 0][None, :])
        assert ratio.min(axis=1).max() <= 1.25, (e.prototype, e.formula)


@pytest.mark.parametrize(
    ("prototype", "formula", "a_exp"),
    [
        ("rocksalt", "NaCl", 5.640),
        ("rocksalt", "MgO", 4.212),
        ("cscl", "CsCl", 4.123),
        ("wurtzite", "ZnO", 3.250),
        ("fluorite", "UO2", 5.470),
        ("antifluorite", "Li2O", 4.619),
        ("rutile", "TiO2", 4.594),
        ("perovskite", "SrTiO3", 3.905),
        ("spinel", "MgAl2O4", 8.083),
    ],
)
def test_lattice_rules_reproduce_textbook_lattice_constants(prototype, formula, a_exp):
    cand = next(c for c in demo.candidates(demo.PROTOTYPES[prototype]) if c.reduced_formula == formula)
    assert cand.structure().lattice.a == pytest.approx(a_exp, rel=0.03)


def test_shannon_radius_falls_back_to_nearest_coordination():
    assert demo.shannon_radius("Zn", 2, 4) == pytest.approx(0.74)
    assert demo.shannon_radius("S", -2, 4) == demo.shannon_radius("S", -2, 6) == pytest.approx(1.70)
    with pytest.raises(ValueError, match="no Shannon radius"):
        demo.shannon_radius("P", -3, 4)


@pytest.mark.filterwarnings("ignore:Issues encountered while parsing CIF:UserWarning")  # 1/3 written as 0.33333333
def test_cli_writes_reproducible_csv_gz_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = tmp_path / "demo.csv.gz"
    assert main(["demo-data", "--out", str(out), "--n", "24", "--seed", "3"]) == 0
    with gzip.open(out, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24
    assert list(rows[0]) == ["material_id", "cif", "formula", "prototype"]
    for row in rows[:6]:
        canon = canonicalize(Structure.from_str(row["cif"], fmt="cif"))
        assert canon.reduced_formula == row["formula"]
        assert canon.spacegroup_number == demo.PROTOTYPES[row["prototype"]].spacegroup
    assert [(e["path"], e["kind"]) for e in read_events(tmp_path / "events.jsonl")] == [("demo.csv.gz", "data")]

    again = tmp_path / "again.csv.gz"
    assert main(["demo-data", "--out", str(again), "--n", "24", "--seed", "3"]) == 0
    assert again.read_bytes() == out.read_bytes()

    before = out.read_bytes()
    capsys.readouterr()
    assert main(["demo-data", "--out", str(out), "--n", "5"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_writes_plain_csv_and_rejects_too_many(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = tmp_path / "demo.csv"
    assert main(["demo-data", "--out", str(out), "--n", "3"]) == 0
    with out.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    too_many = tmp_path / "big.csv"
    assert main(["demo-data", "--out", str(too_many), "--n", "100000"]) == 2
    assert "n must be between" in capsys.readouterr().err
    assert not too_many.exists()


def test_cli_draws_from_the_prototypes_given_and_names_an_unknown_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = tmp_path / "two.csv"
    assert main(["demo-data", "--out", str(out), "--n", "4", "--prototypes", "cscl, rocksalt"]) == 0
    with out.open(newline="") as fh:
        assert sorted(row["prototype"] for row in csv.DictReader(fh)) == ["cscl", "cscl", "rocksalt", "rocksalt"]
    assert main(["demo-data", "--out", str(tmp_path / "bad.csv"), "--prototypes", "rocksalt,halite"]) == 2
    assert "got halite" in capsys.readouterr().err and not (tmp_path / "bad.csv").exists()


def test_the_demo_plan_prompts_a_composition_of_its_own_data_set():
    """The demo samples from a prompt its model has seen the like of: same prototypes, same cell counts."""
    from pymatgen.core import Composition

    from infra.demo import DEMO_PLAN

    prepare, sample = DEMO_PLAN["stages"][0]["params"]["demo"], DEMO_PLAN["stages"][2]["params"]
    entries = demo.demo_entries(prepare["n"], prepare["seed"], prepare["prototypes"])
    cells = {e.structure.composition for e in entries}
    assert Composition(sample["prompt"]) in cells
    assert {e.prototype for e in entries} == set(prepare["prototypes"])
