"""A loopback TCP proxy put between node agents and the master, to cut or stall their connections.

- ``cut()``: every open connection is reset and new ones are refused until ``heal()`` (a network that
  drops: the agent sees UNAVAILABLE at once and retries).
- ``stall()``: connections stay open but nothing is forwarded, and new connections hang unanswered
  (a partition: calls time out). ``heal()`` then resets the stalled connections, as TCP eventually does
  after a long partition, so the agent reconnects.

Only 127.0.0.1 is ever listened on or connected to. Threads: one acceptor, two pumps per connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

POLL_S = 0.05


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(POLL_S)
        self.port = self.listener.getsockname()[1]
        self._mode = "pass"
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def retarget(self, port: int) -> None:
        """Forward new connections to another port (a restarted master)."""
        self.target = ("127.0.0.1", port)

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
        self._reset_all()

    def stall(self) -> None:
        with self._lock:
            self._mode = "stall"
        self._flowing.clear()

    def heal(self) -> None:
        with self._lock:
            stalled, self._mode = self._mode == "stall", "pass"
        if stalled:
            self._reset_all()
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._reset_all()
        self.listener.close()
        self._thread.join(5)

    def _reset_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                _reset(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                mode = self._mode
            if mode == "cut":
                _reset(client)
                continue
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        self._flowing.wait()  # a stalled network answers nothing, not even the connection's first bytes
        if self._closed.is_set():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._conns.append((client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(POLL_S)
        try:
            while not self._closed.is_set():
                if not self._flowing.is_set():
                    self._flowing.wait(POLL_S)
                    continue
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)


def _reset(s: socket.socket) -> None:
    """Close with RST (linger 0), as a dropped connection looks to the peer."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
