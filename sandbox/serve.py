"""Run an emulator app on a loopback port in a background thread (plain HTTP or TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp


@dataclass
class TLSFiles:
    """A throwaway CA (trustme) and a server certificate for 127.0.0.1/localhost."""

    ca_pem: str
    cert_pem: str
    key_pem: str

    @classmethod
    def create(cls, directory: str) -> TLSFiles:
        import os

        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        paths = {
            name: os.path.join(directory, f"sandbox-{name}.pem") for name in ("ca", "cert", "key")
        }
        ca.cert_pem.write_to_path(paths["ca"])
        cert.private_key_pem.write_to_path(paths["key"])
        cert.cert_chain_pems[0].write_to_path(paths["cert"])
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(paths["cert"], append=True)
        return cls(paths["ca"], paths["cert"], paths["key"])


class LoopbackServer:
    """One uvicorn server on 127.0.0.1, started in a daemon thread."""

    def __init__(self, app: ASGIApp, port: int = 0, tls: TLSFiles | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux. Without it, uvicorn's separate
        # writes of headers and body meet the client's delayed ACK: ~40 ms per keep-alive
        # request instead of well under 1 ms.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.tls = tls
        config = uvicorn.Config(
            app,
            log_level="critical",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls.cert_pem if tls else None,
            ssl_keyfile=tls.key_pem if tls else None,
            ssl_cert_reqs=ssl.CERT_NONE,
            timeout_keep_alive=30,
            # Each emulator sends its own `Date`, from its movable clock; uvicorn's would be
            # a second one, from the machine's.
            date_header=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"sandbox-{self.port}")

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        with contextlib.suppress(Exception):
            asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"sandbox server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()
