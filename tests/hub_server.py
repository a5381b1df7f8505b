"""A Hugging Face hub stand-in on 127.0.0.1: files of model repositories in the hub's URL layout.

``GET|HEAD /{owner}/{name}/resolve/{revision}/{filename}`` answers as the hub does for a file
stored with LFS: ``X-Repo-Commit`` (the commit the revision resolves to), ``X-Linked-Etag`` (the
file's sha256) and ``X-Linked-Size``; anything else is a 404 with the hub's error code header.
Every request is logged, so a test can assert that nothing was fetched.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubServer:
    files: dict[tuple[str, str], bytes]  # (repo, filename) -> content
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    url: str = ""

    def fetched(self, filename: str) -> int:
        """GET requests for ``filename`` (HEAD requests only ask for metadata)."""
        return sum(m == "GET" and p.endswith("/" + filename) for m, p in self.requests)


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            parts = self.path.split("?")[0].strip("/").split("/")
            found = None
            if len(parts) == 5 and parts[2] == "resolve" and parts[3] in ("main", COMMIT):
                found = hub.files.get((f"{parts[0]}/{parts[1]}", parts[4]))
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(found).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(found)))
            self.send_header("ETag", f'"{hashlib.sha256(found).hexdigest()}"')
            self.send_header("Content-Length", str(len(found)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(found)

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

    return Handler


def serve(files: dict[tuple[str, str], bytes]):
    """Start the server in a thread; returns (HubServer, stop)."""
    hub = HubServer(files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return hub, stop
