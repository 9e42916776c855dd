"""What the demo's two servers (the simulated upstream and the site) share: a socketserver bound
with an error that names what could not listen, served by a thread of the demo's process."""

from __future__ import annotations

import socketserver
import threading


def bind(server_class: type[socketserver.BaseServer], handler_class, address: str, port: int,
         what: str) -> socketserver.BaseServer:
    """``server_class((address, port), handler_class)``; an OSError says which server could not listen where."""
    try:
        return server_class((address, port), handler_class)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} cannot listen on {address}:{port}: {exc.strerror}") from exc


def serve_in_thread(server: socketserver.BaseServer, name: str, poll_interval: float) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread, started."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, name=name,
                              daemon=True)
    thread.start()
    return thread


def shut_down(server: socketserver.BaseServer, thread: threading.Thread) -> None:
    """End ``serve_forever``, join its thread, then close the server (joining its request threads
    where the server blocks on close) and its socket."""
    server.shutdown()
    thread.join()
    server.server_close()
