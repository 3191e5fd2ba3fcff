"""Run the app with uvicorn on a background thread (tests, benchmarks, notebooks): a real server on a
real socket, on loopback by default, with an ephemeral port unless one is given."""

from __future__ import annotations

import threading
import time

from tinymed.serve.security import check_bind


class BackgroundServer:
    """`with BackgroundServer(app) as server: httpx.get(server.url + "/health")`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 startup_timeout_s: float = 30.0):
        import uvicorn

        check_bind(host, api_key)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="tinymed-uvicorn", daemon=True)
        self._startup_timeout_s = startup_timeout_s
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
