"""The Django site served from the demo's own process (``manage.py demo --serve``).

Without REDIS_URL, breakers, quotas and bulkheads live in each process: a
``runserver`` beside the demo would show its own idle breakers, never the
demo's. Serving the admin from the demo's process shows the breakers the
traffic is opening. The server is Django's threaded development server, as
``runserver`` uses (static files served when DEBUG is on); not for production.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler, get_internal_wsgi_application

from .serving import bind, serve_in_thread, shut_down

DEFAULT_ADDRESS = "127.0.0.1"


def parse_address(value: str) -> tuple[str, int]:
    """``PORT`` or ``ADDRESS:PORT`` (IPv4 or a name) as (address, port); ValueError when it is neither."""
    address, _, port = value.rpartition(":")
    address = address or DEFAULT_ADDRESS
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected PORT or ADDRESS:PORT with a port from 1 to 65535, got {value!r}")
    return address, int(port)


class SiteServer:
    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._server: ThreadedWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> SiteServer:
        handler = get_internal_wsgi_application()
        if settings.DEBUG:
            from django.contrib.staticfiles.handlers import StaticFilesHandler

            handler = StaticFilesHandler(handler)
        self._server = bind(ThreadedWSGIServer, WSGIRequestHandler, self.address, self.port, "the site")
        self.port = self._server.server_address[1]  # the port chosen when 0 was asked for
        self._server.set_app(handler)
        self._thread = serve_in_thread(self._server, f"demo-site-{self.port}", poll_interval=0.2)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        shut_down(server, self._thread)
