import sqlite3

import pytest
from pymatgen.core import Lattice, Structure

from crystallm_core.cif import canonicalize
from crystallm_core.store import FIELDS, Row, Store, parse_filters


def nacl(a=5.64):
    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, fcc + [[(x + 0.5) % 1, y, z] for x, y, z in fcc])


def rutile():
    return Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]
    )


@pytest.fixture(scope="module")
def rows(perov_rows):
    splits = ("train", "val", "test")
    out = [
        Row.from_canonical(r["material_id"], "perov.csv", canonicalize(Structure.from_str(r["cif"], fmt="cif")))
        for r in perov_rows[:60]
    ]
    out += [
        Row.from_canonical("nacl", "handmade", canonicalize(nacl())),
        Row.from_canonical("rutile", "handmade", canonicalize(rutile())),
    ]
    return [Row(**{**r.__dict__, "split": splits[k % 3]}) for k, r in enumerate(out)]


@pytest.fixture
def store(tmp_path, rows):
    with Store.create(tmp_path / "s.sqlite") as s:
        s.add_many(rows)
        yield s


def ids(store, *filters):
    return [r.id for r in store.select(parse_filters(list(filters)))]


def expect(rows, pred):
    return sorted(r.id for r in rows if pred(r))


def test_rows_round_trip_and_come_back_in_id_order(store, rows):
    got = store.select()
    assert [r.id for r in got] == sorted(r.id for r in rows)
    assert {r.id: r for r in got} == {r.id: r for r in rows}
    assert store.count() == len(rows)


def test_elements_are_a_table_of_their_own(store, rows):
    with sqlite3.connect(store.path) as conn:
        n = conn.execute("select count(*) from elements").fetchone()[0]
        na = conn.execute("select structure_id from elements where element = 'Na'").fetchall()
    assert n == sum(len(r.elements) for r in rows)
    assert ("nacl",) in na


def test_element_filters(store, rows):
    common = rows[0].elements[0]
    assert ids(store, f"elements={common}") == expect(rows, lambda r: common in r.elements)
    pair = rows[1].elements[:2]
    assert ids(store, f"elements={','.join(pair)}") == expect(rows, lambda r: set(pair) <= set(r.elements))
    assert ids(store, "exclude_elements=O,Na") == expect(rows, lambda r: not {"O", "Na"} & set(r.elements))
    assert ids(store, "elements=Na,Cl") == ["nacl"]
    na_not_cl = expect(rows, lambda r: "Na" in r.elements and "Cl" not in r.elements)
    assert ids(store, "elements=Na", "exclude_elements=Cl") == na_not_cl
    assert "nacl" not in na_not_cl


def test_spacegroup_filter_by_number_and_symbol(store, rows):
    assert ids(store, "spacegroup=225") == ids(store, "spacegroup=Fm-3m") == ["nacl"]
    assert ids(store, "spacegroup=136") == ["rutile"]
    assert ids(store, "spacegroup=221,P4/mmm") == expect(rows, lambda r: r.spacegroup_number in (221, 123))
    assert ids(store, "spacegroup=P m -3 m") == expect(rows, lambda r: r.spacegroup_number == 221)


def test_nsites_ranges_are_inclusive(store, rows):
    assert {r.nsites for r in rows} >= {5, 6, 8}
    assert ids(store, "nsites=6..8") == expect(rows, lambda r: 6 <= r.nsites <= 8)
    assert ids(store, "nsites=..5") == expect(rows, lambda r: r.nsites <= 5)
    assert ids(store, "nsites=7..") == expect(rows, lambda r: r.nsites >= 7)
    assert ids(store, "nsites=8") == ["nacl"]


def test_split_source_and_formula_filters(store, rows):
    assert ids(store, "split=val") == expect(rows, lambda r: r.split == "val")
    assert store.count(parse_filters(["split=train,test"])) == len(expect(rows, lambda r: r.split != "val"))
    assert ids(store, "source=handmade") == ["nacl", "rutile"]
    assert ids(store, "formula=Na4Cl4") == ids(store, "formula=Na4 Cl4") == ["nacl"]
    assert ids(store, "formula=NaCl") == []  # the cell formula counts the conventional cell
    assert ids(store, "reduced_formula=NaCl") == ids(store, "reduced_formula=Na2Cl2") == ["nacl"]
    target = rows[3]
    assert target.id in ids(store, f"formula={target.formula}", f"split={target.split}")


def test_values_are_bound_not_spliced(store):
    assert ids(store, "source=handmade' OR '1'='1") == []
    assert store.count() > 0


@pytest.mark.parametrize(
    "text,problem",
    [
        ("colour=red", "unknown filter field 'colour'"),
        ("elements", "is not FIELD=VALUE"),
        ("elements=Xx", "unknown element Xx"),
        ("exclude_elements=Na,,Cl", "empty item"),
        ("spacegroup=231", "not in 1..230"),
        ("spacegroup=Pq-3m", "unknown space group 'Pq-3m'"),
        ("nsites=a..b", "is not N, LOW..HIGH"),
        ("nsites=9..2", "empty range 9..2"),
        ("nsites=..", "at least one end"),
        ("split=training", "training is not one of train, val, test"),
        ("formula=ba", "not a chemical formula"),
        ("formula=Qq2", "unknown element Qq"),
        ("reduced_formula=", "not a chemical formula"),
        ("formula=NaCl0.5", "non-integer counts"),
    ],
)
def test_bad_filters_name_the_problem_and_list_fields(text, problem):
    with pytest.raises(ValueError) as info:
        parse_filters([text])
    msg = str(info.value)
    assert problem in msg
    assert repr(text) in msg
    assert "valid fields: " + ", ".join(FIELDS) in msg


def test_add_many_refuses_a_stored_id_and_adds_nothing(store, rows):
    before = store.count()
    fresh = Row(**{**rows[0].__dict__, "id": "brand-new"})
    with pytest.raises(ValueError, match=f"structure id '{rows[5].id}' is already stored"):
        store.add_many([fresh, rows[5]])
    assert store.count() == before
    assert ids(store, "source=perov.csv").count("brand-new") == 0


def test_create_and_open_refuse_wrong_files(tmp_path, store):
    with pytest.raises(FileExistsError, match="already exists"):
        Store.create(store.path)
    with pytest.raises(FileNotFoundError, match="no such store"):
        Store.open(tmp_path / "nothing.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("create table t (x)").connection.close()
    with pytest.raises(ValueError, match="not a data-set store"):
        Store.open(other)
    with Store.open(store.path) as again:
        assert again.count() == store.count()


def test_remove_duplicates_keeps_smallest_volume_per_formula_unit_then_id(tmp_path):
    def row(id_, structure):
        return Row.from_canonical(id_, "t", canonicalize(structure))

    big, small, same = nacl(5.9), nacl(5.5), nacl(5.5)
    with Store.create(tmp_path / "d.sqlite") as s:
        s.add_many([row("a-big", big), row("z-small", small), row("m-small", same), row("r", rutile())])
        removed = s.remove_duplicates()
        assert sorted(removed) == [("a-big", "m-small"), ("z-small", "m-small")]
        assert s.ids() == ["m-small", "r"]
        with sqlite3.connect(s.path) as conn:
            orphans = conn.execute(
                "select count(*) from elements where structure_id not in (select id from structures)"
            )
            assert orphans.fetchone()[0] == 0
