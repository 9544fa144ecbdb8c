"""The metrics endpoint's HTTP server: the standard library's WSGI server, one
thread per request, bounded in clients and in time (see metrics.py).

Its own module because http.server and email come with it: metrics.py imports
it only once metrics are served, never on a start without them. A leaf: it
imports nothing of omerowebd.
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

MAX_CLIENTS = 8  # requests served at once; more are closed unanswered


class Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request, at most MAX_CLIENTS of them.

    Anyone who reaches the address (every local user, on loopback) could
    otherwise hold a thread each, as many as they open connections: the
    daemon's unit then runs out of tasks (systemd's TasksMax) and gunicorn
    can no longer start a worker."""

    daemon_threads = True  # a client that never finishes its request does not hold the daemon's stop
    request_queue_size = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = False
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # TCPServer's bind, not HTTPServer's: that one asks getfqdn(), a DNS lookup on the event loop.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def serve(self) -> None:
        """Serve until :meth:`stop` (the server's thread), then close the listening socket.

        Not serve_forever(): its shutdown() waits for the next poll (up to
        poll_interval) and the caller for the thread, and the caller is the
        event loop, on every reload that moves or ends the endpoint."""
        try:
            with selectors.PollSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                while not self._stopping:
                    # stop() wakes this at once; the timeout only bounds a stop whose wake-up was lost.
                    if selector.select(1.0) and not self._stopping:
                        self._handle_request_noblock()
        finally:
            self.server_close()  # here, once no select() uses the descriptor: never a number reused meanwhile

    def stop(self) -> None:
        """Stop listening now, without waiting (from the event loop); the serving thread ends by itself."""
        self._stopping = True
        try:
            # Linux: a listening socket shut down refuses connections at once, wakes the select() above,
            # and no longer holds its port against a new server's bind (both set SO_REUSEADDR).
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed at once, no thread for it
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: no traceback in the journal for whoever connects


class QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a client has for its whole request and the reply, not for each read

    def handle(self) -> None:
        # The socket's timeout alone bounds each read: a byte every few seconds would hold the slot for ever.
        cut = threading.Timer(self.timeout, self._cut)
        cut.daemon = True
        cut.start()
        try:
            super().handle()
        finally:
            cut.cancel()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the handler's read or write then ends at once
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not news; the journal keeps what matters


def serve(family: int, host: str, port: int, app: Any) -> Server:
    """Listen on (host, port) now and serve ``app`` from a thread of its own until :meth:`Server.stop`."""
    server_class = type("_MetricsServer", (Server,), {"address_family": family})
    server = make_server(host, port, app, server_class, handler_class=QuietHandler)
    threading.Thread(target=server.serve, name="omerowebd-metrics", daemon=True).start()
    return server
