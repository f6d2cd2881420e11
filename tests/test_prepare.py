import csv
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import PEROV_TEST, ROOT
from pymatgen.core import Lattice, Structure

from crystallm_core import cli
from crystallm_core.events import read_events
from crystallm_core.inputs import InputError
from crystallm_core.prepare import PrepareError, assign_splits, prepare
from crystallm_core.store import Store, parse_filters
from crystallm_core.tokens import SPLITS, TokenData, bin_path, read_meta
from crystallm_core.vocab import VocabError, Vocabulary, cif_tokens, get_vocab


def write_csv(path, rows, splits=None):
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif", *(["split"] if splits else [])])
        for k, r in enumerate(rows):
            w.writerow([r["material_id"], r["cif"], *([splits[k]] if splits else [])])
    return path


def read_rejects(out):
    with (out / "rejects.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def store_rows(out, *filters):
    with Store.open(out / "structures.sqlite") as s:
        return s.select(parse_filters(list(filters)))


def assert_token_files_match_store(out):
    """Every CIF of every token file decodes to the store's canonical text, in id order."""
    vocab = get_vocab()
    meta = read_meta(out)
    with Store.open(out / "structures.sqlite") as store:
        for split in SPLITS:
            rows = store.select(parse_filters([f"split={split}", *meta["filters"]]))
            assert meta["splits"][split]["cifs"] == len(rows)
            if not rows:
                assert not bin_path(out, split).exists()
                continue
            data = TokenData(out, split, vocab)
            assert len(data) == len(rows)
            for i, row in enumerate(rows):
                assert data.decode(i) == row.cif


def disordered_cif(row):
    s = Structure.from_str(row["cif"], fmt="cif")
    el = s[0].specie.symbol
    s.replace(0, {el: 0.5, "Zr" if el != "Zr" else "Hf": 0.5})
    return s.to(fmt="cif")


@pytest.mark.slow
def test_cli_prepares_the_full_perov_test_set(tmp_path):
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing")
    out = tmp_path / "perov"
    exe = Path(sys.executable).with_name("crystallm")
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLM_EVENTS"}
    proc = subprocess.run(
        [str(exe), "prepare", "../shared/data/perov_5/test.csv.gz", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    rejected = int(re.search(r"rejected +(\d+) +\((.+rejects\.csv)\)", proc.stdout).group(1))
    assert "structures read        3785" in proc.stdout
    meta = read_meta(out)
    assert meta["counts"]["read"] == 3785
    assert meta["counts"]["rejected"] == rejected == len(read_rejects(out))
    assert meta["counts"]["stored"] == 3785 - rejected
    assert sum(meta["splits"][s]["cifs"] for s in SPLITS) == meta["counts"]["stored"]
    assert meta["vocab_id"] == get_vocab().id
    assert meta["sources"] == [
        {"path": "../shared/data/perov_5/test.csv.gz", "sha256": hashlib.sha256(PEROV_TEST.read_bytes()).hexdigest()}
    ]
    assert meta["unknown_tokens"] == {}
    assert_token_files_match_store(out)
    events = read_events(out / "events.jsonl")
    artifacts = {e["path"] for e in events if e["type"] == "artifact"}
    assert {"structures.sqlite", "meta.json", "train.bin", "train.starts.npy", "val.bin", "test.bin"} <= artifacts
    metric = next(e for e in events if e["type"] == "metric")
    assert metric["values"]["structures_read"] == 3785
    assert metric["values"]["rejected"] == rejected
    assert any(e["type"] == "progress" for e in events)
    with pytest.raises(VocabError):
        TokenData(out, "train", Vocabulary("cif-v1", [*cif_tokens(), "<extra>"]))


def test_rejects_get_their_reason_and_the_run_goes_on(tmp_path, perov_rows):
    rows = [dict(r) for r in perov_rows[:20]]
    rows.append({"material_id": "garbage", "cif": "this is not a CIF\n_cell_length_a x\n"})
    rows.append({"material_id": "disordered", "cif": disordered_cif(perov_rows[20])})
    rows.append({"material_id": "empty", "cif": ""})
    src = write_csv(tmp_path / "in.csv", rows)
    report = prepare([src], tmp_path / "out", workers=2)
    rejects = {r["id"]: r for r in read_rejects(tmp_path / "out")}
    assert set(rejects) == {"garbage", "disordered", "empty"}
    assert "disordered structure" in rejects["disordered"]["reason"]
    assert rejects["garbage"]["reason"] and rejects["empty"]["reason"]
    assert all(r["source"] == str(src) for r in rejects.values())
    assert (report.read, report.rejected, report.stored) == (23, 3, 20)
    assert "rejected               3  (" in report.summary()
    assert_token_files_match_store(tmp_path / "out")


def test_directory_and_tarball_inputs(tmp_path, perov_rows):
    cif_dir = tmp_path / "cifs"
    (cif_dir / "sub").mkdir(parents=True)
    for r in perov_rows[:3]:
        (cif_dir / f"{r['material_id']}.cif").write_text(r["cif"])
    (cif_dir / "sub" / f"{perov_rows[3]['material_id']}.cif").write_text(perov_rows[3]["cif"])
    tar = tmp_path / "more.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for r in perov_rows[4:8]:
            data = r["cif"].encode()
            info = tarfile.TarInfo(f"t/{r['material_id']}.cif")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    report = prepare([str(cif_dir), str(tar)], out, workers=2)
    assert report.stored == 8
    rows = {r.id: r.source for r in store_rows(out)}
    expected = {r["material_id"]: str(cif_dir) for r in perov_rows[:3]}
    expected[f"sub/{perov_rows[3]['material_id']}"] = str(cif_dir)
    expected.update({f"t/{r['material_id']}": str(tar) for r in perov_rows[4:8]})
    assert rows == expected
    sources = read_meta(out)["sources"]
    assert [s["path"] for s in sources] == [str(cif_dir), str(tar)]
    assert sources[1]["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert_token_files_match_store(out)


def test_repeated_ids_across_inputs_are_rejected(tmp_path, perov_rows):
    a = write_csv(tmp_path / "a.csv", perov_rows[:6])
    b = write_csv(tmp_path / "b.csv", perov_rows[4:8])
    report = prepare([a, b], tmp_path / "out", workers=1)
    rejects = read_rejects(tmp_path / "out")
    assert [r["id"] for r in rejects] == [perov_rows[4]["material_id"], perov_rows[5]["material_id"]]
    assert all(r["source"] == str(b) and f"already read from {a}" in r["reason"] for r in rejects)
    assert report.stored == 8


def test_csv_split_column_is_kept(tmp_path, perov_rows):
    rows = perov_rows[:12]
    splits = ["test", "val", "train", "train"] * 3
    src = write_csv(tmp_path / "in.csv", rows, splits)
    report = prepare([src], tmp_path / "out", workers=2, split=(1.0, 0.0, 0.0))
    assert report.split_origin == "input"
    assert {r.id: r.split for r in store_rows(tmp_path / "out")} == {
        r["material_id"]: s for r, s in zip(rows, splits, strict=True)
    }
    meta = read_meta(tmp_path / "out")
    assert meta["split_origin"] == "input" and meta["split_ratios"] is None
    assert {s: meta["splits"][s]["cifs"] for s in SPLITS} == {"train": 6, "val": 3, "test": 3}
    assert_token_files_match_store(tmp_path / "out")


def test_partial_input_splits_give_way_to_ratios(tmp_path, perov_rows):
    with_split = write_csv(tmp_path / "a.csv", perov_rows[:4], ["val"] * 4)
    without = write_csv(tmp_path / "b.csv", perov_rows[4:10])
    report = prepare([with_split, without], tmp_path / "out", workers=2, split=(1.0, 0.0, 0.0))
    assert report.split_origin == "ratios" and report.input_splits_ignored == 4
    assert {r.split for r in store_rows(tmp_path / "out")} == {"train"}
    assert "4 input split values were ignored" in report.summary()


def test_assign_splits_follows_ratios_and_seed():
    ids = [f"s{i:03d}" for i in range(200)]
    a = assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
    assert sorted(a.values()).count("train") == 160 and list(a.values()).count("val") == 20
    assert assign_splits(list(reversed(ids)), (0.8, 0.1, 0.1), seed=0) == a
    assert assign_splits(ids, (0.8, 0.1, 0.1), seed=1) != a
    assert set(assign_splits(ids, (0.0, 0.0, 1.0), seed=3).values()) == {"test"}
    assert list(assign_splits(ids[:10], (0.7, 0.2, 0.1), 0).values()).count("val") == 2


def test_splits_do_not_depend_on_input_order_or_workers(tmp_path, perov_rows):
    rows = perov_rows[:30]
    forward = write_csv(tmp_path / "f.csv", rows)
    backward = write_csv(tmp_path / "b.csv", list(reversed(rows)))
    prepare([forward], tmp_path / "one", workers=1, seed=7, split=(0.5, 0.25, 0.25))
    prepare([backward], tmp_path / "two", workers=2, seed=7, split=(0.5, 0.25, 0.25))
    prepare([forward], tmp_path / "three", workers=2, seed=8, split=(0.5, 0.25, 0.25))
    one = {r.id: r.split for r in store_rows(tmp_path / "one")}
    assert one == {r.id: r.split for r in store_rows(tmp_path / "two")}
    assert one != {r.id: r.split for r in store_rows(tmp_path / "three")}
    for s in SPLITS:
        assert bin_path(tmp_path / "one", s).read_bytes() == bin_path(tmp_path / "two", s).read_bytes()


def test_dedup_keeps_smallest_volume_per_formula_unit_then_smallest_id(tmp_path, perov_rows):
    def nacl(a):
        fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
        return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, fcc + [[(x + 0.5) % 1, y, z] for x, y, z in fcc])

    d = tmp_path / "in"
    d.mkdir()
    (d / "a-large.cif").write_text(nacl(5.9).to(fmt="cif"))
    (d / "c-small.cif").write_text(nacl(5.5).to(fmt="cif"))
    (d / "b-small.cif").write_text(nacl(5.5).to(fmt="cif"))
    (d / "primitive.cif").write_text(nacl(5.7).get_primitive_structure().to(fmt="cif"))
    for r in perov_rows[:5]:
        (d / f"p{r['material_id']}.cif").write_text(r["cif"])
    kept = prepare([d], tmp_path / "dedup", workers=2, dedup=True)
    assert kept.duplicates == 3 and kept.stored == 6
    ids = {r.id for r in store_rows(tmp_path / "dedup")}
    assert "b-small" in ids and not ids & {"a-large", "c-small", "primitive"}
    assert read_meta(tmp_path / "dedup")["counts"]["duplicates"] == 3
    everything = prepare([d], tmp_path / "all", workers=2)
    assert everything.duplicates == 0 and everything.stored == 9


def test_where_selects_what_goes_into_token_files(tmp_path, perov_rows):
    src = write_csv(tmp_path / "in.csv", perov_rows[:40])
    report = prepare([src], tmp_path / "out", workers=2, where=["exclude_elements=O", "spacegroup=221,P4/mmm"])
    selected = store_rows(tmp_path / "out", "exclude_elements=O", "spacegroup=221,P4/mmm")
    assert 0 < report.selected == len(selected) < report.stored == 40
    assert all("O" not in r.elements and r.spacegroup_number in (221, 123) for r in selected)
    meta = read_meta(tmp_path / "out")
    assert meta["filters"] == ["exclude_elements=O", "spacegroup=221,P4/mmm"]
    assert meta["counts"]["selected"] == len(selected)
    assert_token_files_match_store(tmp_path / "out")


def test_selection_json_records_what_was_selected_from_which_sources(tmp_path, perov_rows):
    src = write_csv(tmp_path / "in.csv", perov_rows[:40])
    report = prepare([src], tmp_path / "out", workers=2, where=["exclude_elements=O"], seed=3, limit=30)
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    meta = read_meta(tmp_path / "out")
    assert selection["format"] == "crystallm-selection/1"
    assert selection["filters"] == ["exclude_elements=O"] and selection["limit"] == 30 and selection["seed"] == 3
    assert selection["sources"] == [{"path": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}]
    assert selection["counts"] == meta["counts"] and selection["counts"]["selected"] == report.selected
    with Store.open(tmp_path / "out" / "structures.sqlite") as store:
        for split in SPLITS:  # the ids of each token file, in its order: CIF i is selected[split][i]
            rows = store.select(parse_filters([f"split={split}", "exclude_elements=O"]))
            assert selection["selected"][split] == [r.id for r in rows]
    assert sum(len(v) for v in selection["selected"].values()) == report.selected > 0


def test_existing_data_set_is_never_overwritten(tmp_path, perov_rows, capsys):
    src = write_csv(tmp_path / "in.csv", perov_rows[:5])
    out = tmp_path / "out"
    assert cli.main(["prepare", str(src), "--out", str(out), "--workers", "1"]) == 0
    assert "structures read        5" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "events.jsonl"}
    assert cli.main(["prepare", str(src), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a prepared data set" in err and "structures.sqlite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "events.jsonl"} == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--split", "0.8,0.2"], "need 3 numbers"),
        (["--split", "0.9,0.2,-0.1"], "non-negative"),
        (["--split", "0.5,0.2,0.2"], "must sum to 1"),
        (["--split", "a,b,c"], "not comma-separated numbers"),
        (["--where", "colour=red"], "unknown filter field 'colour'"),
        (["--where", "nsites=3..1"], "empty range"),
        (["--workers", "0"], "workers must be at least 1"),
        (["--vocab", "nope"], "nope"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(tmp_path, perov_rows, capsys, args, message):
    src = write_csv(tmp_path / "in.csv", perov_rows[:2])
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_or_unusable_input_is_named(tmp_path, capsys):
    assert cli.main(["prepare", str(tmp_path / "nothing.csv.gz"), "--out", str(tmp_path / "out")]) == 2
    assert "nothing.csv.gz: no such file" in capsys.readouterr().err
    nocif = tmp_path / "nocif.csv"
    nocif.write_text("material_id,structure\n1,x\n")
    assert cli.main(["prepare", str(nocif), "--out", str(tmp_path / "out")]) == 2
    assert "nocif.csv: CSV has no 'cif' column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_data_set_behind(tmp_path, perov_rows):
    rows = perov_rows[:40]
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif", "split"])
        for k, r in enumerate(rows):
            w.writerow([r["material_id"], r["cif"], "holdout" if k == 35 else "train"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"bad\.csv\.gz, row 36: split 'holdout'"):
        prepare([bad], out, workers=2)
    assert [p.name for p in out.iterdir()] == ["events.jsonl"]
    good = write_csv(tmp_path / "good.csv", rows)
    assert prepare([good], out, workers=2).stored == 40


def test_nothing_selected_is_an_error_but_the_store_stays(tmp_path, perov_rows, capsys):
    src = write_csv(tmp_path / "in.csv", perov_rows[:3])
    out = tmp_path / "out"
    assert cli.main(["prepare", str(src), "--out", str(out), "--where", "elements=Og", "--workers", "1"]) == 1
    assert "no structure went into the token files" in capsys.readouterr().err
    assert len(store_rows(out)) == 3
    assert json.loads((out / "meta.json").read_text())["counts"]["selected"] == 0
    with pytest.raises(PrepareError, match="already holds"):
        prepare([src], out)
