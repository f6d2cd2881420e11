import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pymatgen.core import Structure

from crystallm_core import cli
from crystallm_core.cif import canonicalize
from crystallm_core.evaluate import CHECKS, check_texts, evaluate_texts, summarize
from crystallm_core.events import read_events
from crystallm_core.validity import check

EXE = Path(sys.executable).with_name("crystallm")


@pytest.fixture(scope="module")
def texts(perov_rows, carbon_rows):
    """20 canonical CIFs, then 5 broken ones: unparseable, cell, no_sites, cell, sites."""
    good = [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in perov_rows[:12] + carbon_rows[:8]]
    bad = [
        "",
        "data_x\n",
        good[0][: len(good[0]) // 2],
        good[1].replace("_cell_volume ", "_cell_volume 1", 1),
        good[2] + "Xx Xx9 1 0.0000 0.0000 0.0000 1\n",
    ]
    return good + bad


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command, in a fresh process (stdout must hold nothing but the JSON)."""
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLM_EVENTS"}
    return subprocess.run([str(EXE), "evaluate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_parallel_results_match_serial_and_keep_order(texts):
    serial = [check(t) for t in texts]
    parallel = list(check_texts(texts, workers=2))
    assert [v.to_dict() for v in parallel] == [v.to_dict() for v in serial]
    summary = evaluate_texts(iter(texts), workers=2)  # any iterable
    assert summary == summarize(serial)
    assert summary.count == 25
    assert summary.counts["is_valid"] == sum(v.is_valid for v in serial) == 20
    assert summary.failures_by_reason == {"cell": 2, "unparseable": 1, "no_sites": 1, "sites": 1}
    assert 0 < summary.mean_bond_score <= 1


def test_summary_of_nothing():
    s = evaluate_texts([], workers=2)
    assert s.to_dict() == {
        "count": 0,
        "rates": dict.fromkeys(CHECKS, 0.0),
        "counts": dict.fromkeys(CHECKS, 0),
        "mean_bond_score": None,
        "failures_by_reason": {},
    }


def test_cli_json_over_a_directory_of_cifs(tmp_path, texts):
    cifs = tmp_path / "cifs"
    (cifs / "nested").mkdir(parents=True)
    for i, text in enumerate(texts):
        (cifs / ("nested" if i % 2 else "") / f"s{i:02d}.cif").write_text(text)
    (cifs / "notes.txt").write_text("not a CIF input")
    (cifs / "s99.cif").write_bytes(b"\xff\xfe\x00garbage")
    proc = run_cli(str(cifs), "--json", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert set(out) == {"count", "rates", "counts", "mean_bond_score", "failures_by_reason"}
    assert list(out["rates"]) == ["sensible", "formula_ok", "multiplicity_ok", "bonds_ok", "spacegroup_ok", "is_valid"]
    expected = summarize([check(t) for t in texts] + [check(b"\xff\xfe\x00garbage".decode("latin-1"))])
    assert out == json.loads(json.dumps(expected.to_dict()))
    assert out["count"] == 26 and out["failures_by_reason"]["unparseable"] == 2
    assert not (tmp_path / "events.jsonl").exists()  # no --out and no CRYSTALLM_EVENTS: no events


def test_cli_csv_inputs_single_files_and_out(tmp_path, perov_rows, texts):
    table = tmp_path / "rows.csv.gz"
    with gzip.open(table, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif"])
        for r in perov_rows[:30]:
            w.writerow([r["material_id"], r["cif"]])
        w.writerow(["broken-1", "data_x\n_cell_length_a 4\n"])
    single = tmp_path / "one.cif"
    single.write_text(texts[0])
    out = tmp_path / "report" / "results.jsonl"
    proc = run_cli(str(table), str(single), "--json", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["count"] == 32 and summary["counts"]["is_valid"] == 31
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in lines] == [r["material_id"] for r in perov_rows[:30]] + ["broken-1", "one"]
    assert lines[0]["source"] == str(table) and lines[-1]["source"] == str(single)
    assert not list(out.parent.glob("*.partial"))
    assert lines[30]["is_valid"] is False and lines[30]["reasons"][0].startswith("cell:")
    assert set(lines[0]) == {"id", "source", "is_valid", "sensible", "formula_ok", "multiplicity_ok"} | {
        "spacegroup_ok",
        "bonds_ok",
        "bond_score",
        "reasons",
    }
    evs = read_events(out.parent / "events.jsonl")
    metric = next(e for e in evs if e["type"] == "metric")
    assert metric["values"]["is_valid_rate"] == pytest.approx(31 / 32)
    assert {"type": "artifact", "path": "results.jsonl", "kind": "report"}.items() <= evs[-1].items()
    assert any(e["type"] == "progress" and e["done"] == 32 for e in evs)


def test_cli_events_follow_the_environment(tmp_path, texts, monkeypatch, capsys):
    single = tmp_path / "one.cif"
    single.write_text(texts[0])
    target = tmp_path / "elsewhere" / "ev.jsonl"
    monkeypatch.setenv("CRYSTALLM_EVENTS", str(target))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", str(single)]) == 0
    out = capsys.readouterr().out
    assert "Validity of 1 CIFs" in out and "is_valid" in out  # the table
    assert [e["type"] for e in read_events(target)] == ["progress", "metric"]
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.cif", "no such file"),
        (lambda d: d / "missing_dir", "no such file"),
        (lambda d: _write(d / "table.csv", "material_id,structure\nx,y\n"), "no 'cif' column"),
        (lambda d: _write(d / "notes.txt", "hello"), "unsupported input"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no structures"),
    ],
)
def test_cli_bad_inputs_name_the_path(tmp_path, make, message, capsys):
    path = make(tmp_path)
    assert cli.main(["evaluate", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and path.name in captured.err
    assert captured.out == ""


def test_cli_rejects_zero_workers_and_a_directory_as_out(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_evaluate_is_a_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--workers" in out and "--out" in out and "--json" in out
