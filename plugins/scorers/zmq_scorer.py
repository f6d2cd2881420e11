"""The ``zmq`` scorer: a client of a remote scorer speaking the protocol of ``crystallm scorer serve``.

Options: ``address`` (required, e.g. ``tcp://10.0.0.5:5555``), ``timeout`` (seconds to wait for one
reply, default 60), ``retries`` (further attempts after a time-out, default 3), ``backoff`` (seconds
before the first retry, doubled for each next one, default 0.5) and ``batch_size`` (CIFs per
request, default 256).

The socket is a DEALER. After a time-out it is closed and a fresh one connects, so a request lost
with a crashed server is sent again to its restarted successor and nothing queued for the old
connection lingers; every request carries a new id and replies with another id are discarded.
A server that is down leaves ZeroMQ reconnecting quietly, so an unreachable server shows up as
time-outs; after the last attempt the error names the address.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

import zmq

from crystallm_core.scorer_server import ProtocolError, encode_request, parse_reply
from crystallm_core.scorers import Scorer, ScorerError, ScoreResult, register_scorer

TRANSPORTS = ("tcp://", "ipc://", "inproc://")


class ZmqScorer(Scorer):
    name = "zmq"

    def __init__(
        self, address: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, batch_size: int = 256
    ) -> None:
        if not isinstance(address, str) or not address.startswith(TRANSPORTS):
            raise ValueError(f"option address must be a ZeroMQ address such as tcp://host:5555, got {address!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1:
            raise ValueError("options need timeout > 0, retries >= 0, backoff >= 0 and batch_size >= 1")
        self.address, self.timeout, self.retries, self.backoff, self.batch_size = (
            address,
            float(timeout),
            int(retries),
            float(backoff),
            int(batch_size),
        )
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.requests = 0
        self.timeouts = 0

    def _connect(self) -> zmq.Socket:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)
        return self.sock

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        out: list[ScoreResult] = []
        for start in range(0, len(cifs), self.batch_size):
            out.extend(self._request(cifs[start : start + self.batch_size]))
        return out

    def _request(self, cifs: Sequence[str]) -> list[ScoreResult]:
        rid = uuid.uuid4().hex
        payload = encode_request(rid, cifs)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            sock = self._connect() if attempt or self.sock is None else self.sock
            sock.send_multipart([b"", payload])  # the empty frame makes DEALER look like REQ to the server
            self.requests += 1
            reply = self._await(sock, rid)
            if reply is not None:
                try:
                    return parse_reply(reply, rid, len(cifs))
                except ScorerError as exc:
                    raise ScorerError(f"scorer server at {self.address} refused the request: {exc}") from None
                except ProtocolError as exc:
                    raise ScorerError(f"scorer server at {self.address} sent a malformed reply: {exc}") from None
            self.timeouts += 1
        raise ScorerError(
            f"scorer server at {self.address} did not answer within {self.timeout:g} s "
            f"({self.retries + 1} attempts); is `crystallm scorer serve` running there?"
        )

    def _await(self, sock: zmq.Socket, rid: str) -> bytes | None:
        """The reply to ``rid``, or None after ``timeout`` seconds; replies to other ids are dropped."""
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            reply = sock.recv_multipart()[-1]
            try:
                if json.loads(reply).get("id") not in (rid, None):
                    continue  # a late answer to an earlier request
            except (ValueError, AttributeError):
                pass  # let parse_reply name the problem
            return reply
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        self.ctx.term()


register_scorer("zmq", ZmqScorer)
