import csv
import gzip
import io
import tarfile

import pytest

from crystallm_core.inputs import InputError, Record, input_kind, read_input, read_inputs


def write_csv(path, header, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def cifs(perov_rows):
    return {r["material_id"]: r["cif"] for r in perov_rows[:4]}


def test_directory_is_read_recursively_with_relative_ids(tmp_path, cifs):
    ids = list(cifs)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / f"{ids[0]}.cif").write_text(cifs[ids[0]])
    (tmp_path / "sub" / f"{ids[1]}.cif").write_text(cifs[ids[1]])
    (tmp_path / "sub" / "deeper" / f"{ids[2]}.cif").write_text(cifs[ids[2]])
    (tmp_path / "notes.txt").write_text("not a structure")
    records = list(read_input(str(tmp_path)))
    assert sorted(r.id for r in records) == sorted([ids[0], f"sub/{ids[1]}", f"sub/deeper/{ids[2]}"])
    assert all(r.source == str(tmp_path) and r.split is None for r in records)
    by_id = {r.id: r.text for r in records}
    assert by_id[f"sub/{ids[1]}"] == cifs[ids[1]]


@pytest.mark.parametrize("name,mode", [("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tgz", "w:gz")])
def test_tarball_members_become_records(tmp_path, cifs, name, mode):
    path = tmp_path / name
    with tarfile.open(path, mode) as tf:
        for i, (cid, text) in enumerate(cifs.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"./set/{cid}.cif" if i == 0 else f"set/{cid}.cif")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("set/README")
        readme.size = 2
        tf.addfile(readme, io.BytesIO(b"hi"))
    records = list(read_input(path))
    assert [r.id for r in records] == [f"set/{cid}" for cid in cifs]
    assert [r.text for r in records] == list(cifs.values())
    assert all(isinstance(r, Record) and r.source == str(path) for r in records)


def test_csv_ids_prefer_material_id_then_id_then_row_number(tmp_path, cifs):
    texts = list(cifs.values())[:2]
    a = write_csv(tmp_path / "a.csv.gz", ["material_id", "id", "cif"], [["m1", "i1", texts[0]]], gz=True)
    b = write_csv(tmp_path / "b.csv", ["id", "cif"], [["i1", texts[0]], ["i2", texts[1]]])
    c = write_csv(tmp_path / "c.csv", ["cif", "formula"], [[texts[0], "x"], [texts[1], "y"]])
    assert [r.id for r in read_input(a)] == ["m1"]
    assert [r.id for r in read_input(b)] == ["i1", "i2"]
    assert [r.id for r in read_input(c)] == ["1", "2"]
    assert [r.text for r in read_input(c)] == texts


def test_csv_split_column_is_kept_and_checked(tmp_path, cifs):
    texts = list(cifs.values())
    good = write_csv(
        tmp_path / "g.csv", ["material_id", "cif", "split"], [["a", texts[0], "val"], ["b", texts[1], "test"]]
    )
    assert [(r.id, r.split) for r in read_input(good)] == [("a", "val"), ("b", "test")]
    bad = write_csv(
        tmp_path / "bad.csv", ["material_id", "cif", "split"], [["a", texts[0], "train"], ["b", texts[1], "training"]]
    )
    with pytest.raises(InputError, match=r"bad\.csv, row 2: split 'training'"):
        list(read_input(bad))


def test_real_csv_gz_reads_every_row(perov_rows):
    from conftest import PEROV_TEST

    records = read_input(PEROV_TEST)
    first = [next(records) for _ in range(len(perov_rows))]
    assert [r.id for r in first] == [r["material_id"] for r in perov_rows]
    assert first[0].source == str(PEROV_TEST)


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="missing.csv: no such file"):
        input_kind(tmp_path / "missing.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match=r"x\.json: unsupported input"):
        read_input(tmp_path / "x.json")
    nocif = write_csv(tmp_path / "n.csv", ["material_id", "structure"], [["a", "b"]])
    with pytest.raises(InputError, match=r"n\.csv: CSV has no 'cif' column \(columns: 'material_id', 'structure'\)"):
        read_input(nocif)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: holds no structures"):
        list(read_input(tmp_path / "empty"))
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(InputError, match=r"broken\.tar\.gz: not a readable tar archive"):
        list(read_input(tmp_path / "broken.tar.gz"))
    blank = write_csv(tmp_path / "blank.csv", ["material_id", "cif"], [["a", "x"], ["", "y"]])
    with pytest.raises(InputError, match=r"blank\.csv, row 2: empty 'material_id'"):
        list(read_input(blank))


def test_every_input_is_checked_before_the_first_record(tmp_path, cifs):
    good = write_csv(tmp_path / "g.csv", ["cif"], [[t] for t in cifs.values()])
    with pytest.raises(InputError, match=r"missing\.tgz: no such file"):
        read_inputs([good, tmp_path / "missing.tgz"])
    nocif = write_csv(tmp_path / "n.csv", ["material_id"], [["a"]])
    with pytest.raises(InputError, match="no 'cif' column"):
        read_inputs([good, nocif])
    assert [r.text for r in read_inputs([good, good])] == list(cifs.values()) * 2
