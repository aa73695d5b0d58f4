"""A small Hugging Face hub on 127.0.0.1 for the tests (`HF_ENDPOINT`): the file endpoint that
`huggingface_hub.hf_hub_download` uses, serving files the tests put in it.

    HEAD/GET /{owner}/{repo}/resolve/{revision}/{path}

answers with the headers the client reads (`X-Repo-Commit`, `ETag`, `Content-Length`) and, for
what is not there, 404 with the hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`), which the client turns into its typed errors. `revision` is `main` or the
repo's commit hash.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.parse


class HubServer:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802
                hub._answer(self, body=False)

            def do_GET(self):  # noqa: N802
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def commit(self, repo_id: str) -> str:
        files = sorted(self.repos[repo_id].items())
        digest = hashlib.sha1(repo_id.encode())
        for name, data in files:
            digest.update(name.encode() + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, handler, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound")
        repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return self._error(handler, 404, "RepoNotFound")
        commit = self.commit(repo_id)
        if revision not in ("main", commit):
            return self._error(handler, 404, "RevisionNotFound")
        data = self.repos[repo_id].get(name)
        if data is None:
            return self._error(handler, 404, "EntryNotFound")
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler, status: int, code: str) -> None:
        message = f"{code}: {handler.path}".encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", code)
        handler.send_header("Content-Length", str(len(message)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(message)
