"""Tokens, roles and (mutual) TLS against a real master, node and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select

from infra.master.models import Token
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

from .conftest import Cluster

pytestmark = pytest.mark.timeout(180)
certs = pytest.importorskip("control.certs", reason="the TLS tests need the cryptography package")


def _token(cluster: Cluster, *args: str, admin_file: Path | None = None) -> dict[str, Any]:
    if admin_file is None:  # bootstrap: straight into the master's database
        cmd = [sys.executable, "-m", "infra.cli", "token", "create", *args, "--db", cluster.db_url, "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=60, check=True)
        return json.loads(out.stdout)
    return json.loads(cluster.cli("token", "create", *args, "--json", "--token-file", str(admin_file)).stdout)


def _save(cluster: Cluster, name: str, token: str) -> Path:
    path = cluster.tmp / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_tokens_roles_and_mutual_tls(cluster: Cluster) -> None:
    ca = certs.Authority(cluster.tmp / "pki", "ca")
    server, node_cert, user_cert = ca.issue("master", server=True), ca.issue("node"), ca.issue("user")
    rogue = certs.Authority(cluster.tmp / "rogue", "rogue").issue("intruder")
    admin = _token(cluster, "--user", "root", "--admin")
    join = _token(cluster, "--join")
    assert admin["role"] == "admin" and join["role"] == "node" and admin["token"].startswith("inf1.")

    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(ca.pem.cert)]
    cluster.start_master("--auth", *tls)
    cluster.client_args = [
        "--tls-ca",
        str(ca.pem.cert),
        "--tls-cert",
        str(user_cert.cert),
        "--tls-key",
        str(user_cert.key),
    ]
    admin_file = _save(cluster, "admin", admin["token"])
    join_file = _save(cluster, "join", join["token"])
    node_tls = ["--tls-ca", str(ca.pem.cert), "--tls-cert", str(node_cert.cert), "--tls-key", str(node_cert.key)]
    cluster.start_node("secure", "--join-token-file", str(join_file), *node_tls)
    alice = _save(cluster, "alice", _token(cluster, "--user", "alice", admin_file=admin_file)["token"])
    bob_info = _token(cluster, "--user", "bob", admin_file=admin_file)
    bob = _save(cluster, "bob", bob_info["token"])

    def as_(who: Path, *args: str, check: bool = True) -> Any:
        return cluster.cli(*args, "--token-file", str(who), check=check)

    cluster.wait_for(
        lambda: any(
            n["online"] and n["usage"] for n in json.loads(as_(admin_file, "status", "--json").stdout)["nodes"]
        ),
        60,
        "the node to join with its token over mutual TLS and heartbeat on its stream (usage comes with heartbeats)",
    )
    plan = cluster.tmp / "plan.json"
    plan.write_text(json.dumps({"name": "mine", "stages": [{"name": "s", "kind": "probe", "params": {"metrics": 1}}]}))
    key = as_(alice, "submit", str(plan)).stdout.strip()

    # alice sees and reads her experiment; bob neither sees nor reads nor cancels it; the admin does all
    assert [e["experiment"] for e in json.loads(as_(alice, "status", "--json").stdout)["experiments"]] == [key]
    assert json.loads(as_(bob, "status", "--json").stdout)["experiments"] == []
    for args in (
        ("status", key),
        ("logs", f"{key}/s"),
        ("metrics", f"{key}/s"),
        ("artifacts", key),
        ("cancel", key),
        ("rerun", key),
    ):
        out = as_(bob, *args, check=False)
        assert out.returncode == 1 and f"permission denied: experiment '{key}' belongs to 'alice'" in out.stderr, out
    exp = json.loads(as_(admin_file, "status", key, "--json").stdout)["experiments"][0]
    assert exp["owner"] == "alice"
    cluster.wait_for(
        lambda: json.loads(as_(alice, "status", key, "--json").stdout)["experiments"][0]["state"] == "succeeded",
        60,
        "alice's experiment to succeed",
    )
    assert json.loads(as_(alice, "metrics", f"{key}/s", "--json").stdout)[0]["values"]["loss"] == 1.0
    got = cluster.tmp / "out.txt"  # relayed: the node's upload carries its join token too
    as_(alice, "artifacts", key, "--get", "artifacts/s/out.txt", "-o", str(got))
    assert got.read_bytes() == b"probe output\n"
    assert "nothing to rerun" in as_(alice, "rerun", key, check=False).stderr  # her own: allowed, refused as done
    assert "needs an admin token" in as_(alice, "node", "drain", "secure", check=False).stderr
    assert as_(admin_file, "node", "drain", "secure").stdout.startswith("node secure: drained")
    assert as_(admin_file, "node", "undrain", "secure").stdout.startswith("node secure: undrained")

    # no token, a wrong one, a revoked one; a user managing tokens; a node token on client calls
    out = cluster.cli("status", check=False)
    assert out.returncode == 1 and "unauthenticated: this master requires a token" in out.stderr
    wrong = _save(cluster, "wrong", bob_info["token"][:-4] + "AAAA")
    assert f"invalid token (id {bob_info['id']})" in as_(wrong, "status", check=False).stderr
    assert "needs an admin token" in as_(alice, "token", "list", check=False).stderr
    assert "may only call node RPCs" in as_(join_file, "status", check=False).stderr
    as_(admin_file, "token", "revoke", str(bob_info["id"]))
    assert f"token {bob_info['id']} was revoked" in as_(bob, "status", check=False).stderr
    listed = json.loads(as_(admin_file, "token", "list", "--json").stdout)
    assert {(t["user"], t["role"], t["revoked"]) for t in listed} >= {("root", "admin", False), ("bob", "user", True)}

    # transport: a user token on a node call; no client certificate; a certificate from another CA
    creds = grpc.ssl_channel_credentials(
        ca.pem.cert.read_bytes(), user_cert.key.read_bytes(), user_cert.cert.read_bytes()
    )
    with grpc.secure_channel(cluster.address, creds) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id="x")
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(req, timeout=10, metadata=[("authorization", f"Bearer {alice.read_text().strip()}")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "join token" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for client_tls in (
        ["--tls-ca", str(ca.pem.cert)],
        ["--tls-ca", str(ca.pem.cert), "--tls-cert", str(rogue.cert), "--tls-key", str(rogue.key)],
    ):
        cluster.client_args = client_tls
        out = cluster.cli("status", "--token-file", str(admin_file), check=False, timeout=60)
        assert out.returncode == 1 and "cannot reach the master" in out.stderr

    # secrets are nowhere: not in the logs, not in the database (only their SHA-256)
    logs = (cluster.tmp / "master.log").read_text() + (cluster.tmp / "secure.log").read_text()
    secrets = [admin["token"], join["token"], alice.read_text().strip(), bob_info["token"]]
    assert not [t for t in secrets if t.split(".")[2] in logs]
    engine = create_engine(cluster.db_url)
    try:
        with engine.connect() as conn:
            stored = [h for (h,) in conn.execute(select(Token.secret_sha256))]
    finally:
        engine.dispose()
    assert len(stored) == 4 and not {t.split(".")[2] for t in secrets} & set(stored)


def test_no_auth_is_for_loopback_only(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "infra.cli", "master", "--db", f"sqlite:///{tmp_path / 'm.db'}", "--bind"]
    out = subprocess.run([*cmd, "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0:0 without authentication" in out.stderr
    out = subprocess.run([*cmd, "127.0.0.1:0", "--tls-cert", "x.pem"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "TLS needs both --tls-cert and --tls-key" in out.stderr
