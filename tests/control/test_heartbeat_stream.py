"""Heartbeats as messages on the stream a node keeps open (``HeartbeatStream``), against a real master on
loopback: each message is acknowledged in order and updates the node's usage, a stream that breaks is
only silence (the lost timeout decides), and a node the master no longer knows is told through the
stream to register again. The client is the agent's own (``infra.node.agent.Beats``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from infra.node.agent import Beats
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

from .conftest import Cluster

HEARTBEAT = 0.5


def _register(stub: infra_pb2_grpc.NodeServiceStub, name: str) -> int:
    facts = infra_pb2.NodeFacts(name=name, hostname="sim", cpu_count=4, memory_mib=8192, stage_kinds=["evaluate"])
    req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts)
    return stub.Register(req, timeout=30).session


def _beat(name: str, session: int, cpu: float = 0.0, unavailable: str = "") -> infra_pb2.HeartbeatRequest:
    req = infra_pb2.HeartbeatRequest(node_id=name, session=session, unavailable=unavailable)
    req.usage.cpu_percent, req.usage.memory_total_mib = cpu, 8192
    return req


def _commands(stub: infra_pb2_grpc.NodeServiceStub, name: str, session: int) -> Any:
    """The node's command stream, held open as an agent holds it (a node without one is not online)."""
    return stub.Assignments(infra_pb2.AssignmentStreamRequest(node_id=name, session=session), timeout=60)


def _node(channel: grpc.Channel, name: str) -> infra_pb2.NodeStatus:
    status = infra_pb2_grpc.ClientServiceStub(channel).GetStatus(infra_pb2.StatusRequest(), timeout=30)
    return next(n for n in status.nodes if n.node_id == name)


@pytest.fixture
def channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    cluster.start_master("--lost-timeout", "2", heartbeat=HEARTBEAT)
    with grpc.insecure_channel(cluster.address) as ch:
        yield ch


def test_heartbeats_on_the_stream_are_acknowledged_in_order_and_update_the_node(channel: grpc.Channel) -> None:
    stub = infra_pb2_grpc.NodeServiceStub(channel)
    session = _register(stub, "n1")
    commands, beats = _commands(stub, "n1", session), Beats(stub)
    try:
        for i, cpu in enumerate((10.0, 20.0, 30.0), start=1):
            ack = beats.send(_beat("n1", session, cpu), timeout=10)
            assert (ack.seq, ack.reregister, list(ack.revoked)) == (i, False, [])
        node = Cluster.wait_for(lambda: (n := _node(channel, "n1")).state == "online" and n, 10, "the node online")
        assert node.usage.cpu_percent == 30.0 and node.heartbeat_age_s < 5
        beats.send(_beat("n1", session, 40.0, unavailable="workdir nearly full"), timeout=10)
        node = _node(channel, "n1")
        assert node.usage.cpu_percent == 40.0 and node.unavailable == "workdir nearly full"
    finally:
        beats.close()
        commands.cancel()


def test_a_broken_stream_is_silence_and_the_node_is_lost_only_after_the_lost_timeout(channel: grpc.Channel) -> None:
    stub = infra_pb2_grpc.NodeServiceStub(channel)
    session = _register(stub, "n1")
    commands, beats = _commands(stub, "n1", session), Beats(stub)
    assert not beats.send(_beat("n1", session), timeout=10).reregister
    beats.close()  # the heartbeat stream breaks (its command stream stays open); nothing else is heard

    broken = time.monotonic()
    time.sleep(1.0)
    assert _node(channel, "n1").state == "online", "a broken stream lost the node before the lost timeout (2 s)"
    deadline = time.monotonic() + 15
    while _node(channel, "n1").state != "lost":
        assert time.monotonic() < deadline, "the silent node was never declared lost"
        time.sleep(0.1)
    assert time.monotonic() - broken >= 2.0
    assert list(commands) == []  # losing it ended its command stream
    beats = Beats(stub)  # it comes back on a new stream: the master says to register again
    try:
        assert beats.send(_beat("n1", session), timeout=10).reregister
        session = _register(stub, "n1")
        assert not beats.send(_beat("n1", session), timeout=10).reregister, "the same stream carries the new session"
        commands = _commands(stub, "n1", session)
        Cluster.wait_for(lambda: _node(channel, "n1").state == "online", 10, "the node to be online again")
    finally:
        beats.close()
        commands.cancel()


def test_a_restarted_master_tells_the_node_through_the_stream_to_register_again(cluster: Cluster) -> None:
    cluster.start_master(heartbeat=HEARTBEAT)
    with grpc.insecure_channel(cluster.address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        session = _register(stub, "n1")
        beats = Beats(stub)
        assert not beats.send(_beat("n1", session), timeout=10).reregister
        cluster.kill_master()
        with pytest.raises((grpc.RpcError, OSError)):  # the stream broke with its master
            beats.send(_beat("n1", session), timeout=10)
        beats.close()
        cluster.restart_master()
        beats = Beats(stub)
        try:
            deadline = time.monotonic() + 30
            while True:  # the channel reconnects to the new master
                try:
                    ack = beats.send(_beat("n1", session), timeout=10)
                    break
                except (grpc.RpcError, OSError):
                    assert time.monotonic() < deadline, "the new master never answered"
                    beats.close()
                    beats = Beats(stub)
                    time.sleep(0.2)
            assert ack.reregister, "the restarted master accepted a session it never gave"
            session = _register(stub, "n1")
            assert not beats.send(_beat("n1", session), timeout=10).reregister
        finally:
            beats.close()


class _Mute(infra_pb2_grpc.NodeServiceServicer):
    """A master that takes heartbeats and never acknowledges them (a stuck loop, a half-open path)."""

    def HeartbeatStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for _ in request_iterator:
            pass
        return iter(())


def test_a_heartbeat_left_unacknowledged_gives_the_stream_up_within_its_timeout() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    infra_pb2_grpc.add_NodeServiceServicer_to_server(_Mute(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            beats = Beats(infra_pb2_grpc.NodeServiceStub(channel))
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="not acknowledged within 0.5s"):
                beats.send(_beat("n1", 1), timeout=0.5)
            assert time.monotonic() - started < 5
            beats.close()
    finally:
        server.stop(None)
