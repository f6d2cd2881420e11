"""Files of an experiment record fetched through the master from a real node agent, and live progress."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from infra.client import Client, ClientError
from infra.node.uploads import upload_messages
from infra.protos import infra_pb2

pytestmark = pytest.mark.timeout(180)
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
PROBE = {"name": "fetch", "stages": [{"name": "p", "kind": "probe", "params": {"metrics": 1}}]}


def _record(cluster: Any, node: str, key: str) -> Path:
    return cluster.workdir(node) / "experiments" / key


@SQLITE
def test_fetch_through_the_master(cluster: Any, tmp_path: Path) -> None:
    cluster.start_master("--artifact-max-bytes", "40MiB")
    cluster.start_node("n1", "--cpus", "2", "--memory", "4GiB", "--fake-gpus", "0")
    cluster.wait_online("n1")
    key = cluster.submit(PROBE)
    assert cluster.wait_finished(key)["state"] == "succeeded"
    record = _record(cluster, "n1", key)

    # as listed (relative to the node's workdir) and relative to the record: byte-identical
    listed = [a["path"] for a in json.loads(cluster.cli("artifacts", key, "--json").stdout)]
    assert f"experiments/{key}/artifacts/p/out.txt" in listed
    out = tmp_path / "out.txt"
    got = json.loads(cluster.cli("artifacts", key, "--get", listed[0], "-o", str(out), "--json").stdout)
    assert out.read_bytes() == (record / "artifacts/p/out.txt").read_bytes() == b"probe output\n"
    assert got["sha256"] == hashlib.sha256(b"probe output\n").hexdigest() and got["resumed_from"] == 0
    cluster.cli("artifacts", key, "--get", "logs/p.log", "-o", str(tmp_path / "p.log"))
    assert (tmp_path / "p.log").read_bytes() == (record / "logs/p.log").read_bytes()

    # escapes are refused: by the master (absolute, ..) and by the node (a link leading outside)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for clients")
    (record / "artifacts" / "evil").symlink_to(secret)
    r = cluster.cli("artifacts", key, "--get", "artifacts/evil", "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 1 and "is outside the experiment directory" in r.stderr
    with Client(cluster.address) as client:
        for path, why in [
            ("../../../secret.txt", "without '..'"),
            (str(secret), "without '..'"),
            (f"experiments/{key}/../x/plan.json", "without '..'"),
            ("artifacts/none.txt", "no file artifacts/none.txt"),
        ]:
            with pytest.raises(ClientError, match=why):
                client.fetch_artifact(key, path, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing came: no empty file left

    # a 30 MB file: the client goes away mid-stream, then resumes to identical bytes
    big = record / "artifacts" / "big.bin"
    big.write_bytes(os.urandom(30 << 20))
    part = tmp_path / "big.bin"
    with Client(cluster.address) as client:
        call = client.stub.GetArtifact(infra_pb2.GetArtifactRequest(experiment=key, path="artifacts/big.bin"))
        with part.open("wb") as fh:
            for i, m in enumerate(call):
                fh.write(m.data)
                if i == 5:
                    call.cancel()
                    break
        have = part.stat().st_size
        assert 0 < have < big.stat().st_size
        req = infra_pb2.GetArtifactRequest(experiment=key, path="artifacts/big.bin", stat=True)
        stat = list(client.stub.GetArtifact(req))
        assert [(m.size, m.last, m.data) for m in stat] == [(30 << 20, True, b"")]
        result = client.fetch_artifact(key, "artifacts/big.bin", part)
        assert result["resumed_from"] == have and result["fetched"] == big.stat().st_size - have
        assert part.read_bytes() == big.read_bytes()
        again = client.fetch_artifact(key, "artifacts/big.bin", part, offset=1000)  # --offset: cut there, resume
        assert again["fetched"] == big.stat().st_size - 1000 and part.read_bytes() == big.read_bytes()
        # a partial copy of another file: the sha256 of the whole file says so
        other = tmp_path / "other.bin"
        other.write_bytes(b"x" * 1000)
        with pytest.raises(ClientError, match="sha256 differs"):
            client.fetch_artifact(key, "artifacts/big.bin", other)
        again = tmp_path / "again.txt"
        client.fetch_artifact(key, "artifacts/p/out.txt", again)
        assert again.read_bytes() == b"probe output\n"
        # over --artifact-max-bytes: refused before a byte is sent
        with (record / "artifacts" / "huge.bin").open("wb") as fh:
            fh.truncate((40 << 20) + 1)  # sparse: no 40 MiB written
        with pytest.raises(ClientError, match="41943041 bytes, over the master's limit of 41943040 bytes"):
            client.fetch_artifact(key, "artifacts/huge.bin", tmp_path / "huge.bin")

    # the holding node goes away: a clear error naming it
    cluster.kill_node("n1")

    def offline() -> str | None:
        r = cluster.cli("artifacts", key, "--get", "artifacts/p/out.txt", "-o", str(tmp_path / "y"), check=False)
        return r.stderr if "is offline" in r.stderr else None

    err = cluster.wait_for(offline, 30, "the fetch to fail as offline")
    assert f"{key}: node n1 holding artifacts/p/out.txt is offline" in err


@SQLITE
def test_shared_workdir_is_served_by_a_node_that_has_it(cluster: Any, tmp_path: Path) -> None:
    cluster.start_master()
    shared = cluster.workdir("shared")
    for name in ("n1", "n2"):
        cluster.start_node(name, "--cpus", "1", "--memory", "2GiB", "--fake-gpus", "0", "--workdir", str(shared))
    cluster.wait_online("n1", "n2")
    key = cluster.submit({**PROBE, "shared_workdir": True})
    exp = cluster.wait_finished(key)
    assert exp["state"] == "succeeded"
    holder = exp["stages"][0]["node"]
    cluster.kill_node(holder)
    # the other node on the same (shared) workdir serves the file: the holder being gone is no error
    out = tmp_path / "out.txt"

    def fetched() -> bool:
        r = cluster.cli("artifacts", key, "--get", "artifacts/p/out.txt", "-o", str(out), check=False)
        return r.returncode == 0

    cluster.wait_for(fetched, 30, "another node to serve the file")
    assert out.read_bytes() == b"probe output\n"


@SQLITE
def test_status_returns_the_progress_of_a_running_stage(cluster: Any) -> None:
    cluster.start_master()
    cluster.start_node("n1", "--cpus", "1", "--memory", "2GiB", "--fake-gpus", "0")
    cluster.wait_online("n1")
    key = cluster.submit({"name": "prog", "stages": [{"name": "p", "kind": "probe", "params": {"seconds": 60}}]})

    def progress() -> list[dict[str, Any]] | None:
        return cluster.status(key)["experiments"][0]["stages"][0]["progress"] or None

    assert cluster.wait_for(progress, 60, "progress of the running stage") == [{"what": "probe", "done": 1, "total": 1}]
    # --watch without a terminal: a line per change, ending with the experiment
    cluster.cli("cancel", key)
    r = cluster.cli("status", key, "--watch", "--json", check=False, timeout=60)
    assert r.returncode == 1 and json.loads(r.stdout.splitlines()[-1])["state"] == "cancelled"
    assert cluster.status(key)["experiments"][0]["stages"][0]["progress"] == []


def test_fetch_needs_the_owner(tmp_path: Path) -> None:
    """A user sees only their own experiments' files (the relay checks before asking any node)."""
    import asyncio

    from infra.master.artifacts import ArtifactError, ArtifactRelay
    from infra.master.auth import Identity
    from infra.master.state import ClusterState

    async def holders(fn: Any, engine: Any, key: str, reported: str) -> dict[str, Any] | None:
        return {"owner": "alice", "shared_workdir": False, "nodes": []} if key == "e-1" else None

    relay = ArtifactRelay(ClusterState(), engine=None, read=holders, node_state=lambda n: "online", max_bytes=1 << 20)

    async def fetch(key: str, path: str, who: str) -> None:
        async for _ in relay.stream(key, path, user=Identity(who, "user")):
            pass

    with pytest.raises(ArtifactError, match="belongs to 'alice'; user 'bob' may only access their own"):
        asyncio.run(fetch("e-1", "plan.json", "bob"))
    with pytest.raises(ArtifactError, match="no experiment 'e-2'"):
        asyncio.run(fetch("e-2", "plan.json", "alice"))
    with pytest.raises(ArtifactError, match="no node holds its files yet"):
        asyncio.run(fetch("e-1", "plan.json", "alice"))
    with pytest.raises(ArtifactError, match="without '..'") as e:
        asyncio.run(fetch("e-1", "../e-2/plan.json", "alice"))
    assert e.value.kind == "invalid"


def _fetch(record_root: Path, path: str, **kw: Any) -> list[Any]:
    f = infra_pb2.FetchArtifact(transfer_id=7, experiment="e-1", path=path, **kw)
    return list(upload_messages(record_root.parent.parent, f, "node-a", 3, chunk=1000))


def test_the_node_sends_chunks_of_the_record_only(tmp_path: Path) -> None:
    root = tmp_path / "work" / "experiments" / "e-1"
    (root / "ckpts").mkdir(parents=True)
    data = os.urandom(2500)
    (root / "ckpts" / "last.pt").write_bytes(data)
    (tmp_path / "outside.txt").write_text("secret")
    (root / "ckpts" / "link").symlink_to(tmp_path / "outside.txt")

    first, *chunks, last = _fetch(root, "ckpts/last.pt", offset=1200)
    assert (first.node_id, first.session, first.transfer_id, first.size, first.data) == ("node-a", 3, 7, 2500, b"")
    assert [(c.offset, len(c.data)) for c in chunks] == [(1200, 1000), (2200, 300)]
    assert b"".join(c.data for c in chunks) == data[1200:]
    assert last.last and last.sha256 == hashlib.sha256(data).hexdigest()  # of the whole file, resumed or not
    assert [(m.size, m.last, m.data) for m in _fetch(root, "ckpts/last.pt", stat=True)] == [(2500, True, b"")]

    def refused(path: str, **kw: Any) -> tuple[str, str]:
        (m,) = _fetch(root, path, **kw)
        return m.error_kind, m.error

    assert refused("ckpts/last.pt", max_bytes=2000) == (
        "too_large",
        "ckpts/last.pt is 2500 bytes, over the master's limit of 2000 bytes",
    )
    assert refused("ckpts/last.pt", offset=2501)[0] == "invalid"
    assert refused("ckpts/link")[0] == "invalid" and "outside the experiment directory" in refused("ckpts/link")[1]
    assert refused("../../outside.txt")[0] == "invalid"
    assert refused("ckpts")[1] == "path 'ckpts' is not a regular file"
    assert refused("ckpts/none.pt") == ("not_found", "no file ckpts/none.pt in the experiment record")
    f = infra_pb2.FetchArtifact(transfer_id=7, experiment="e-2", path="plan.json")
    (m,) = upload_messages(tmp_path / "work", f, "node-a", 3)
    assert (m.error_kind, m.error) == ("not_found", "this node has no directory for experiment e-2")
