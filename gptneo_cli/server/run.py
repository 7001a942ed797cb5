"""Running the app under uvicorn on a socket we bind ourselves (so port 0 works and the
startup line shows the real port)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; raises OSError (port in use, bad host) before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


#: Seconds uvicorn waits, after the grace period, for the answers that `on_exit` ended to
#: be sent before it cuts the connections.
CUT_AFTER = 5.0


def make_server(
    app: Any,
    shutdown_timeout: float,
    ready: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
) -> Any:
    """A uvicorn Server: quiet (we log our own line per request), graceful on SIGINT/SIGTERM
    for `shutdown_timeout` seconds before open connections are cut. `ready` runs once it
    listens, with its signal handlers in place (so the startup line means "Ctrl-C is safe").
    `on_exit` runs at the first signal: `gptneo serve` closes its scheduler there with the
    grace period, so requests still running at its end are cancelled and their streams end
    with a finish reason and `data: [DONE]` instead of a cut connection."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(shutdown_timeout, 0.1) + (CUT_AFTER if on_exit else 0),
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if ready is not None and not self.should_exit:
                ready()

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and on_exit is not None:
                on_exit()
            # uvicorn re-raises the signal once it has stopped; a stop we asked for with
            # Ctrl-C or SIGTERM is a clean exit (0), so it is not re-raised.
            self._captured_signals.clear()

    return Server(config)
