"""Running the API: ``pixquery serve`` in the foreground, and a server on a thread for tests and benchmarks
(a real uvicorn server on a free local port, called over HTTP)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Serve ``app`` until interrupted (Ctrl+C, SIGTERM)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "info",
                server_header=False, timeout_graceful_shutdown=5)


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` a uvicorn server on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    access_log=False, server_header=False))
        self.thread = threading.Thread(target=self.server.run, name="pixquery-api-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
