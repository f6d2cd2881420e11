import random
import re
from functools import cache

import pytest
from conftest import CARBON_VAL, read_rows
from pymatgen.core import Lattice, Structure

from crystallm_core import cif, spacegroups
from crystallm_core.cif import PROPS_HEADER, canonicalize, parse_structure, symops_block
from crystallm_core.postprocess import postprocess
from crystallm_core.validity import (
    BOND_SCORE_THRESHOLD,
    REASON_CODES,
    Validity,
    check,
    check_published,
    detect_spacegroup,
    expected_bond,
    reason_code,
)


@pytest.fixture(scope="module")
def perov(perov_rows):
    return [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in perov_rows]


@pytest.fixture(scope="module")
def carbon(carbon_rows):
    return [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in carbon_rows]


def assert_consistent(v: Validity) -> None:
    """A verdict is invalid exactly when it has reasons, and every reason has a known code."""
    assert v.is_valid == (not v.reasons), v
    assert all(reason_code(r) in REASON_CODES for r in v.reasons), v.reasons


def set_tag(text: str, tag: str, value: str) -> str:
    out, n = re.subn(rf"^{re.escape(tag)} .*$", f"{tag} {value}", text, count=1, flags=re.M)
    assert n == 1, tag
    return out


def tag_value(text: str, tag: str) -> str:
    return re.search(rf"^{re.escape(tag)} (.*)$", text, flags=re.M).group(1)


def site_lines(text: str) -> tuple[str, list[str]]:
    head, body = text.split("_atom_site_occupancy\n")
    return head + "_atom_site_occupancy\n", body.splitlines(keepends=True)


def edit_site(text: str, k: int, column: int, value: str) -> str:
    head, rows = site_lines(text)
    words = rows[k].split()
    words[column] = value
    rows[k] = " ".join(words) + "\n"
    return head + "".join(rows)


# ---------------------------------------------------------------- real structures


def test_canonical_real_structures_are_valid(perov, carbon):
    for text in perov:
        v = check(text)
        assert v.is_valid, v.reasons
        assert v.bond_score == 1.0
    results = [check(t) for t in carbon]
    for v in results:
        assert_consistent(v)
        assert v.sensible and v.formula_ok and v.multiplicity_ok and v.bonds_ok, v.reasons
    assert sum(v.is_valid for v in results) >= 0.98 * len(results)


def test_raw_pymatgen_p1_cifs_are_valid(perov_rows, carbon_rows):
    for row in perov_rows[:50] + carbon_rows[:50]:
        v = check(row["cif"])
        assert v.is_valid, (row["material_id"], v.reasons)


def test_canonical_carbon_states_the_group_it_redetects():
    """Idealizing C-172917-5417-5 at symprec 0.1 lands within 0.1 Å of C2/m; the canonical text
    says so (canonicalize iterates), and passes every check."""
    row = next(r for r in read_rows(CARBON_VAL, 200) if r["material_id"] == "C-172917-5417-5")
    canon = canonicalize(Structure.from_str(row["cif"], fmt="cif"))
    assert canon.spacegroup_number == 12
    assert check(canon.text).is_valid


def test_a_stated_group_other_than_the_detected_one_is_reported():
    text = canonicalize(Structure.from_str(PEROV_CUBIC, fmt="cif")).text
    assert "Pm-3m" in text
    wrong = text.replace("_symmetry_space_group_name_H-M Pm-3m", "_symmetry_space_group_name_H-M P4/mmm")
    wrong = wrong.replace("_symmetry_Int_Tables_number 221", "_symmetry_Int_Tables_number 123")
    v = check(wrong)
    assert "spacegroup" in v.codes
    assert any("stated 123 (P4/mmm) but spglib finds 221 (Pm-3m)" in r for r in v.reasons)


PEROV_CUBIC = """data_SrTiO3
_cell_length_a 3.905
_cell_length_b 3.905
_cell_length_c 3.905
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Sr Sr0 0 0 0 1
Ti Ti1 0.5 0.5 0.5 1
O O2 0.5 0.5 0 1
O O3 0.5 0 0.5 1
O O4 0 0.5 0.5 1
"""


# ---------------------------------------------------------------- corrupted CIFs


def corruptions(texts: list[str], rng: random.Random) -> list[tuple[str, str, set[str]]]:
    """(kind, text, acceptable reason codes) for CIFs that are broken by construction."""
    out: list[tuple[str, str, set[str]]] = []
    parse_codes = {"unparseable", "cell", "no_sites", "sites", "symops", "formula", "multiplicity"}
    for text in texts:
        cut = rng.randrange(0, len(text) - 2)  # at least the last occupancy is lost
        out.append(("truncated", text[:cut], parse_codes))
    for _ in range(20):
        out.append(
            (
                "random bytes",
                bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))).decode("latin-1"),
                {"unparseable"},
            )
        )
    out += [("empty", "", {"unparseable"}), ("blank", " \n\t\n", {"unparseable"}), ("none", None, {"unparseable"})]
    for text in texts[:15]:
        a = float(tag_value(text, "_cell_length_a"))
        volume = float(tag_value(text, "_cell_volume"))
        out.append(("volume", set_tag(text, "_cell_volume", f"{volume * 1.5:.4f}"), {"cell"}))
        out.append(("length shuffled", set_tag(text, "_cell_length_a", f"{a * 1.37:.4f}"), {"cell"}))
        out.append(("huge length", set_tag(text, "_cell_length_b", "1e30"), {"cell"}))
        out.append(("infinite length", set_tag(text, "_cell_length_c", "1e999"), {"cell"}))
        out.append(("nan angle", set_tag(text, "_cell_angle_beta", "nan"), {"cell"}))
        out.append(("flat angle", set_tag(text, "_cell_angle_gamma", "179.5"), {"cell"}))
        out.append(("nan coordinate", edit_site(text, 0, 3, "nan"), {"sites"}))
        out.append(("huge coordinate", edit_site(text, 0, 4, "1e300"), {"sites"}))
        out.append(("unknown element", edit_site(text, 0, 0, "Xx"), {"sites"}))
        out.append(("partial occupancy", edit_site(text, 0, 6, "0.5"), {"sites"}))
        out.append(("no sites", text.split("loop_\n_atom_site_type_symbol")[0], {"no_sites"}))
        out.append(("singular operator", text.replace("'x, y, z'", "'x, x, z'", 1), {"symops"}))
        out.append(("garbled operator", text.replace("'x, y, z'", "'x, y, q'", 1), {"symops"}))
    for text in texts[:30]:
        _, rows = site_lines(text)
        k = rng.randrange(len(rows))
        mult = int(rows[k].split()[2])
        out.append(("multiplicity", edit_site(text, k, 2, str(mult + rng.choice((1, 2, 3)))), {"multiplicity"}))
        name = text.split("\n", 1)[0]
        wrong = re.sub(r"\d+$", lambda m: str(int(m.group()) + 1), name)
        out.append(("data_ formula", text.replace(name, wrong, 1), {"formula"}))
        total = tag_value(text, "_chemical_formula_sum")
        more = re.sub(r"\d+'$", lambda m: f"{int(m.group()[:-1]) + 5}'", total)
        out.append(("formula sum", text.replace(total, more, 1), {"formula", "multiplicity"}))
        out.append(("structural formula", set_tag(text, "_chemical_formula_structural", "Li2O"), {"formula"}))
        z = int(tag_value(text, "_cell_formula_units_Z"))
        out.append(("Z", set_tag(text, "_cell_formula_units_Z", str(z + 1)), {"formula"}))
        head, rows = site_lines(text)
        w = rows[0].split()
        twin = f"{w[0]} {w[0]}x {w[2]} {float(w[3]) + 0.01:.4f} {w[4]} {w[5]} 1\n"
        out.append(("overlap", head + "".join(rows) + twin, {"overlap"}))
        out.append(("compressed", scale_cell(text, 0.4), {"bonds"}))
        out.append(("expanded", scale_cell(text, 3.5), {"bonds"}))
        out.append(("space group", restate_group(text), {"spacegroup"}))
    return out


def scale_cell(text: str, f: float) -> str:
    for tag in ("_cell_length_a", "_cell_length_b", "_cell_length_c"):
        text = set_tag(text, tag, f"{float(tag_value(text, tag)) * f:.4f}")
    return set_tag(text, "_cell_volume", f"{float(tag_value(text, '_cell_volume')) * f**3:.4f}")


def restate_group(text: str) -> str:
    """Claim P-1 or Pm-3m instead of the true group (keeping the true operators)."""
    n = int(tag_value(text, "_symmetry_Int_Tables_number"))
    other = 2 if n != 2 else 221
    text = set_tag(text, "_symmetry_Int_Tables_number", str(other))
    return set_tag(text, "_symmetry_space_group_name_H-M", spacegroups.symbol(other))


def test_corrupted_cifs_are_invalid_with_a_reason(perov, carbon):
    rng = random.Random(20261127)
    cases = corruptions(perov[:70] + carbon[:30], rng)
    assert len(cases) >= 200
    for kind, text, codes in cases:
        v = check(text)
        assert_consistent(v)
        assert not v.is_valid, (kind, text)
        assert set(v.codes) & codes, (kind, v.reasons, text)
        assert "internal" not in v.codes, (kind, v.reasons)


def test_random_edits_never_raise(perov):
    """Single-character edits anywhere: every verdict is well formed and nothing raises."""
    rng = random.Random(7)
    alphabet = "0123456789.-+ \n'_xyzloop_data_ABCabcNaOe"
    for _ in range(300):
        text = rng.choice(perov)
        i = rng.randrange(len(text))
        edited = text[:i] + rng.choice(alphabet) + text[i + 1 :]
        assert_consistent(check(edited))


# ---------------------------------------------------------------- individual checks

CUBE = "data_x\n" + "".join(f"{tag} {v}\n" for tag, v in zip(cif.CELL_TAGS, (4, 4, 4, 90, 90, 90), strict=True))
SITE = "loop_\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\nNa 0 0 0\n"


@cache
def rocksalt() -> str:
    """Canonical NaCl (Fm-3m, 4 formula units in the conventional cell)."""
    na = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    cl = [[0.5, 0.5, 0.5], [0, 0, 0.5], [0, 0.5, 0], [0.5, 0, 0]]
    return canonicalize(Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4, na + cl)).text


def test_formula_reason_names_both_formulas():
    text = rocksalt().replace("data_Na4Cl4", "data_Na4Cl3")
    v = check(text)
    assert v.codes == ["formula"]
    assert v.reasons == ["formula: data_ line says Na4Cl3 but sites give Na4Cl4"]


def test_data_name_conventions():
    text = rocksalt()
    assert check(text.replace("data_Na4Cl4", "data_NaCl")).is_valid  # pymatgen: reduced formula
    assert check(text.replace("data_Na4Cl4", "data_global")).is_valid  # not a formula: states nothing
    assert not check(text.replace("data_Na4Cl4", "data_Na2Cl2")).is_valid  # explicit counts are the cell
    assert not check(text.replace("data_Na4Cl4", "data_NaBr")).is_valid


def test_formula_sum_may_follow_the_iucr_convention():
    """'Na1 Cl1' with Z=4 (the IUCr way) states the same cell as 'Na4 Cl4'; with Z=2 it does not."""
    text = set_tag(rocksalt(), "_chemical_formula_sum", "'Na1 Cl1'")
    assert tag_value(text, "_cell_formula_units_Z") == "4"
    assert check(text).is_valid
    v = check(set_tag(text, "_cell_formula_units_Z", "2"))
    assert v.codes == ["formula", "multiplicity"]


def test_multiplicity_reason():
    text = rocksalt().replace("Na Na0 4 ", "Na Na0 8 ")
    v = check(text)
    assert "multiplicity" in v.codes
    assert any("states 8 but its orbit has 4 positions" in r for r in v.reasons)


def test_p1_is_always_a_true_statement_but_other_groups_must_match():
    nacl = parse_structure(rocksalt())
    p1 = nacl.to(fmt="cif")  # pymatgen writes P1 with every atom listed
    assert "P 1" in p1 and detect_spacegroup(nacl) == 225
    assert check(p1).is_valid
    claimed = p1.replace("_symmetry_Int_Tables_number   1", "_symmetry_Int_Tables_number   2")
    claimed = claimed.replace("'P 1'", "P-1")
    v = check(claimed)
    assert v.codes == ["spacegroup"]
    assert "spglib finds 225 (Fm-3m)" in v.reasons[0]


def test_spacegroup_symbol_and_number_must_agree():
    text = set_tag(rocksalt(), "_symmetry_space_group_name_H-M", "Pm-3m")
    assert check(text).codes == ["spacegroup"]


def test_no_stated_group_is_consistent_only_for_an_identity_listing():
    p1 = parse_structure(rocksalt()).to(fmt="cif")
    bare = re.sub(r"_symmetry_(space_group_name_H-M|Int_Tables_number).*\n", "", p1)
    assert check(bare).is_valid
    fm3m = re.sub(r"_symmetry_(space_group_name_H-M|Int_Tables_number).*\n", "", rocksalt())
    assert check(fm3m).codes == ["spacegroup"]


def test_overlapping_and_isolated_atoms():
    text = rocksalt()
    head, rows = site_lines(text)
    v = check(head + "".join(rows) + "Na Nax 4 0.0100 0.0000 0.0000 1\n")
    assert "overlap" in v.codes and not v.bonds_ok
    far = scale_cell(text, 3.0)  # Na-Cl at 8.5 Å: no neighbour within twice the bond length
    v = check(far)
    assert v.codes == ["bonds"] and v.bond_score == 0.0
    assert "isolated" in v.reasons[0]
    assert BOND_SCORE_THRESHOLD == 1.0


def test_expected_bond_lengths():
    assert expected_bond("C", "C") == pytest.approx(1.46)  # covalent, Cordero radii
    assert expected_bond("Na", "Cl") == pytest.approx(1.16 + 1.67)  # ionic, Shannon radii
    assert expected_bond("O", "H") == pytest.approx(0.66 + 0.31)  # bonds to H are covalent
    assert expected_bond("Cl", "Na") == expected_bond("Na", "Cl")


def test_hydrogen_bonds_are_reasonable():
    """Ice-like O-H at 0.97 Å is a normal bond, not an overlap."""
    s = Structure(Lattice.cubic(4.0), ["O", "H", "H"], [[0, 0, 0], [0.2425, 0, 0], [0, 0.2425, 0]])
    v = check(s.to(fmt="cif"))
    assert v.bonds_ok, v.reasons


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        ("loop_\n_atom_site_type_symbol\n_atom_site_fract_x\nNa 0\n", "sites"),  # no fract_y column
        ("loop_\n_symmetry_equiv_pos_as_xyz\n" + SITE, "symops"),  # empty operator loop
        ("loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, .z'\n" + SITE, "symops"),
        ("loop_\n_symmetry_equiv_pos_as_xyz\n'x+1/0, y, z'\n" + SITE, "symops"),
        ("_symmetry_Int_Tables_number 999\n" + SITE, "symops"),  # no operators, no usable group
    ],
)
def test_reader_edge_cases_get_their_own_codes(tail, code):
    v = check(CUBE + tail)
    assert v.codes == [code], v.reasons


def test_check_never_raises_on_odd_types():
    for value in (None, b"data_x", 42, "data_\n", "loop_\n", "data_x\nloop_\n_a\n_b\n1\n"):
        v = check(value)  # type: ignore[arg-type]
        assert not v.is_valid and v.reasons


# ---------------------------------------------------------------- postprocess


def test_postprocess_round_trip(perov, carbon):
    for text in perov[:40] + carbon[:20]:
        clean = postprocess(text)
        assert PROPS_HEADER not in clean
        assert clean == text.replace(text[text.index(PROPS_HEADER) : text.index("loop_\n_atom_site_type_symbol")], "")
        assert postprocess(clean) == clean
        assert check(clean).is_valid == check(text).is_valid


def test_postprocess_restores_the_operators_of_the_stated_group():
    text = rocksalt()
    broken = text.replace(symops_block(225), symops_block(1))
    assert check(broken).codes == ["formula", "multiplicity", "spacegroup"]  # one Na and one Cl, in P1
    fixed = postprocess(broken)
    assert symops_block(225) in fixed and PROPS_HEADER not in fixed
    assert check(fixed).is_valid


def test_postprocess_leaves_what_it_cannot_act_on():
    for text in (
        "",
        "garbage \x00\x01",
        "data_x\n_symmetry_space_group_name_H-M Qq9\nloop_\n_symmetry_equiv_pos_as_xyz\n'x'\n",
    ):
        assert postprocess(text) == text
    assert postprocess(None) is None  # type: ignore[arg-type]


def test_postprocess_reads_the_symbol_first():
    text = rocksalt()
    assert symops_block(225) in postprocess(set_tag(text, "_symmetry_Int_Tables_number", "221"))
    unknown = set_tag(text, "_symmetry_space_group_name_H-M", "Qq")
    assert symops_block(225) in postprocess(unknown)


def test_postprocess_recomputes_the_volume_from_the_cell():
    text = rocksalt()
    stated = next(ln for ln in text.splitlines() if ln.startswith("_cell_volume "))
    off = set_tag(text, "_cell_volume", "150.1234")
    assert "cell" in check(off).codes  # a volume the cell parameters do not give
    fixed = postprocess(off)
    assert stated in fixed.splitlines() and check(fixed).is_valid
    no_cell = off.replace("_cell_length_b", "_cell_length_q")
    assert "_cell_volume 150.1234" in postprocess(no_cell)  # nothing to compute from: left alone


# ---------------------------------------------------------------- the published (CDVAE/DiffCSP) rule


def test_published_rule_on_real_structures(perov, carbon):
    """Every real cell is structurally valid; carbon (one element) always passes SMACT, while perov_5 holds
    hypothetical perovskites that no charge-neutral assignment explains (Cs1Rb1N3), as the papers found."""
    verdicts = [check_published(t) for t in perov + carbon]
    assert all(v.structure_ok for v in verdicts)
    assert all(check_published(t).is_valid for t in carbon)
    assert "data_Cs1Rb1N3\n" in "".join(t for t in perov if not check_published(t).composition_ok)


def test_published_rule_structure_part():
    """Only volume and a 0.5 Å minimum distance count: a cell our bond check rejects can pass."""
    lattice = Lattice.cubic(4.0)
    near = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])  # 0.4 Å apart
    apart = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.15, 0, 0]])  # 0.6 Å: too short for a bond
    assert not check_published(near.to(fmt="cif")).structure_ok
    assert check_published(apart.to(fmt="cif")).structure_ok
    assert not check(canonicalize(apart).text).is_valid


def test_published_rule_composition_part():
    lattice = Lattice.cubic(5.0)
    nacl2 = Structure(lattice, ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    v = check_published(nacl2.to(fmt="cif"))
    assert v.structure_ok and not v.composition_ok and not v.is_valid
    carbon = Structure(lattice, ["C", "C"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # one element: always charge-valid
    assert check_published(carbon.to(fmt="cif")).is_valid


def test_published_rule_never_raises():
    for text in ["", "data_x\n", "garbage \x00", "data_x\n_cell_length_a -1\n"]:
        assert not check_published(text).is_valid
