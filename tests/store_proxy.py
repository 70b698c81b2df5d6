"""A TCP proxy in front of an S3 API server, for a store that fails (tests/test_object_store.py,
tests/test_lease.py, benchmarks/faults.py --store s3)."""

from __future__ import annotations

import socket
import threading
import time


class StoreProxy:
    """Mode "ok" forwards; "refuse" closes every new connection and cuts the open ones; "stall"
    accepts connections and answers none (an open one goes silent after the chunk under way) until
    the mode changes, when it cuts them; "slowdown" answers every request 503 SlowDown (S3's
    throttling)."""

    _BODY = (
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    )
    SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY))

    def __init__(self, target: int) -> None:
        self.target, self.mode = target, "ok"
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.seen = {"refused": 0, "throttled": 0, "stalled": 0}
        self.conns: set[socket.socket] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def set(self, mode: str) -> None:
        """Switch modes; "refuse" and "slowdown" also cut every connection under way, as does the
        end of a stall."""
        was, self.mode = self.mode, mode
        if mode not in ("ok", "stall") or was == "stall":
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                self.seen["refused"] += 1
                c.close()
                continue
            if self.mode == "stall":  # held open, silent; cut when the stall ends
                self.seen["stalled"] += 1
                self.conns.add(c)
                continue
            if self.mode == "slowdown":
                self.seen["throttled"] += 1
                threading.Thread(target=self._throttle, args=(c,), daemon=True).start()
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns |= {c, u}
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _throttle(self, c: socket.socket) -> None:
        try:
            c.settimeout(5)
            head = c.recv(65536).startswith(b"HEAD ")  # a response to HEAD has no body
            c.sendall(self.SLOWDOWN.split(b"\r\n\r\n")[0] + b"\r\n\r\n" if head else self.SLOWDOWN)
        except OSError:
            pass
        c.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while self.mode in ("ok", "stall"):
                if self.mode == "stall":  # an open connection goes silent too
                    time.sleep(0.05)
                    continue
                if not (data := a.recv(65536)):
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            self.conns.discard(s)
            try:
                s.close()
            except OSError:
                pass
