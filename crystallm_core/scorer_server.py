"""``crystallm scorer``: serve any registered scorer over ZeroMQ, or score CIF files from the shell.

The wire protocol (version 1, see docs/MCTS.md) is JSON in one ZeroMQ frame each way:

* request: ``{"protocol": 1, "id": "<string>", "cifs": ["<cif text>", ...]}``
* reply: ``{"protocol": 1, "id": "<same>", "results": [{"score": -7.93}, {"error": "<reason>"}, ...]}``,
  one result per CIF in request order;
* error reply (the request as a whole was refused): ``{"protocol": 1, "id": "<id or null>", "error": "<why>"}``.

The server's socket is a ROUTER: it answers REQ clients and DEALER clients (which send the same
empty delimiter frame as REQ) alike, and one malformed message never leaves it in a state where it
cannot answer the next, which a REP socket's strict send/receive alternation would risk. Requests
are scored one after another, each batch in one call to the scorer.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import zmq

from crystallm_core.scorers import (
    Scorer,
    ScorerError,
    ScoreResult,
    failure,
    make_scorer,
    parse_options,
    score_checked,
)

PROTOCOL = 1
MAX_ID_CHARS = 128
DEFAULT_MAX_BYTES = 64 * 2**20
MAX_ITEMS = 65536  # CIFs in one request
HARD_LIMIT_FACTOR = 4  # above max_bytes * this, ZeroMQ drops the connection instead of reading the message
POLL_MS = 200  # how often the serve loop looks at its stop flag


class ProtocolError(ValueError):
    """A message that does not follow the scorer protocol; the text says what is wrong with it."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id  # echoed in the error reply when the request's id was readable


def encode_request(request_id: str, cifs: Sequence[str]) -> bytes:
    return json.dumps({"protocol": PROTOCOL, "id": request_id, "cifs": list(cifs)}).encode()


def encode_reply(
    request_id: str | None, results: Sequence[ScoreResult] | None = None, error: str | None = None
) -> bytes:
    body: dict[str, Any] = {"protocol": PROTOCOL, "id": request_id}
    if error is not None:
        body["error"] = error
    else:
        body["results"] = [r.to_dict() for r in results or ()]
    return json.dumps(body).encode()


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8 text") from None
    except ValueError as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_protocol(obj: dict[str, Any], what: str) -> None:
    version = obj.get("protocol")
    if type(version) is not int:
        raise ProtocolError(f"{what} field 'protocol' must be the integer {PROTOCOL}, got {version!r}")
    if version != PROTOCOL:
        raise ProtocolError(f"{what} speaks protocol {version}; this side speaks {PROTOCOL}")


def parse_request(payload: bytes, max_items: int) -> tuple[str, list[str]]:
    """The id and CIFs of a request; :class:`ProtocolError` otherwise (with the id if it was readable)."""
    obj = _json_object(payload, "request")
    rid = obj.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise ProtocolError(f"request field 'id' must be a string of 1 to {MAX_ID_CHARS} characters, got {rid!r:.80}")
    try:
        _check_protocol(obj, "request")
    except ProtocolError as exc:
        raise ProtocolError(str(exc), rid) from None
    unknown = sorted(set(obj) - {"protocol", "id", "cifs"})
    if unknown:
        raise ProtocolError(f"request has unknown field(s) {', '.join(unknown)}", rid)
    cifs = obj.get("cifs")
    if not isinstance(cifs, list):
        raise ProtocolError(f"request field 'cifs' must be a list of strings, got {type(cifs).__name__}", rid)
    if len(cifs) > max_items:
        raise ProtocolError(f"request field 'cifs' has {len(cifs)} items; the limit is {max_items}", rid)
    bad = next((i for i, c in enumerate(cifs) if not isinstance(c, str)), None)
    if bad is not None:
        raise ProtocolError(f"request field 'cifs' item {bad} is {type(cifs[bad]).__name__}, not a string", rid)
    return rid, cifs


def parse_reply(payload: bytes, request_id: str, n: int) -> list[ScoreResult]:
    """Results of a reply to ``request_id`` for ``n`` CIFs; ProtocolError on malformed replies,
    ScorerError when the server refused the request."""
    obj = _json_object(payload, "reply")
    _check_protocol(obj, "reply")
    if "error" in obj and obj.get("id") in (request_id, None):  # None: the server could not read our id
        raise ScorerError(str(obj["error"]))
    if obj.get("id") != request_id:
        raise ProtocolError(f"reply is for request {obj.get('id')!r}, not {request_id!r}")
    results = obj.get("results")
    if not isinstance(results, list) or len(results) != n:
        raise ProtocolError(f"reply field 'results' must be a list of {n} items")
    out = []
    for i, item in enumerate(results):
        score, error = (item.get("score"), item.get("error")) if isinstance(item, dict) else (None, None)
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            out.append(ScoreResult(score=float(score)))
        elif isinstance(error, str):
            out.append(failure(error))
        else:
            raise ProtocolError(
                f"reply result {i} must be {{'score': number}} or {{'error': string}}, got {item!r:.80}"
            )
    return out


class ScorerServer:
    """Answers scorer-protocol requests on ``bind`` until :meth:`stop` (or SIGTERM/SIGINT in :meth:`serve`)."""

    def __init__(
        self, scorer: Scorer, bind: str, max_bytes: int = DEFAULT_MAX_BYTES, max_items: int = MAX_ITEMS
    ) -> None:
        self.scorer, self.max_bytes, self.max_items = scorer, max_bytes, max_items
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes * HARD_LIMIT_FACTOR)
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ScorerError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests = 0
        self._stop = False

    def handle(self, payload: bytes) -> bytes:
        """The reply to one request; never raises."""
        if len(payload) > self.max_bytes:
            return encode_reply(None, error=f"request of {len(payload)} bytes exceeds the limit of {self.max_bytes}")
        try:
            rid, cifs = parse_request(payload, self.max_items)
        except ProtocolError as exc:
            return encode_reply(exc.request_id, error=str(exc))
        try:
            results = score_checked(self.scorer, cifs)
        except Exception as exc:  # a scorer bug must not take the server down
            return encode_reply(rid, error=f"scorer {self.scorer.name!r} failed: {type(exc).__name__}: {exc}")
        return encode_reply(rid, results)

    def poll_once(self, timeout_ms: int = POLL_MS) -> bool:
        """Answer one message if one arrives within ``timeout_ms``; True if one was answered."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return False
        frames = self.sock.recv_multipart()
        self.requests += 1
        identity, rest = frames[0], frames[1:]
        delimiter = [b""] if rest and rest[0] == b"" else []
        body = rest[len(delimiter) :]
        if len(body) != 1:
            reply = encode_reply(None, error=f"expected one message frame after the envelope, got {len(body)}")
        else:
            reply = self.handle(body[0])
        self.sock.send_multipart([identity, *delimiter, reply])
        return True

    def stop(self) -> None:
        self._stop = True

    def serve(self) -> None:
        """Serve until :meth:`stop` (from the main thread: also SIGTERM or SIGINT), then return; the caller closes."""
        main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if main else ()
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        try:
            while not self._stop:
                self.poll_once()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


# ---------------------------------------------------------------- the verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve a scorer over ZeroMQ (stops on SIGTERM/SIGINT)")
    score = sub.add_parser("score", help="score CIF files (.cif, directories, CSV with a cif column); JSON lines out")
    for q in (serve, score):
        q.add_argument("--scorer", required=True, help="registered scorer name (crystallm plugins list)")
        q.add_argument("--option", action="append", default=[], metavar="K=V", help="scorer option, repeatable")
        q.add_argument("--device", default="auto", help="device for scorers that take one")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ address, e.g. tcp://127.0.0.1:5555")
    serve.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request answered")
    score.add_argument("paths", nargs="+", metavar="PATH", help="CIF files, directories or CSV(.gz) files to score")
    score.add_argument("--batch-size", type=int, default=256, help="CIFs per scorer call (default 256)")


def _error(message: str) -> int:
    print(f"crystallm scorer: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        options = parse_options(args.option, "--option")
        if args.action == "serve" and args.max_bytes < 1024:
            raise ValueError(f"--max-bytes must be at least 1024, got {args.max_bytes}")
        if args.action == "score" and args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        scorer = make_scorer(args.scorer, options, device=args.device)
    except (ValueError, ScorerError) as exc:
        return _error(str(exc))
    try:
        return _serve(scorer, args) if args.action == "serve" else _score(scorer, args)
    finally:
        scorer.close()


def _serve(scorer: Scorer, args: argparse.Namespace) -> int:
    try:
        server = ScorerServer(scorer, args.bind, args.max_bytes)
    except ScorerError as exc:
        return _error(f"--bind {exc}")
    print(f"crystallm scorer: serving {args.scorer!r} on {server.endpoint}", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    print(f"crystallm scorer: stopped after {server.requests} requests", flush=True)
    return 0


def _score(scorer: Scorer, args: argparse.Namespace) -> int:
    from crystallm_core.evaluate import read_records
    from crystallm_core.inputs import InputError

    try:
        records = read_records(args.paths)
    except InputError as exc:
        return _error(str(exc))
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        try:
            results = score_checked(scorer, [r.text for r in chunk])
        except ScorerError as exc:
            print(f"crystallm scorer: {exc}", file=sys.stderr)
            return 1
        for record, result in zip(chunk, results):
            print(json.dumps({"id": record.id, "source": record.source, **result.to_dict()}), flush=True)
    return 0
