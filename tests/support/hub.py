"""A local stand-in for the Hugging Face Hub's dataset file API, enough for `hf://datasets/`
reads through huggingface_hub's HfFileSystem: repo info, paths-info, and `resolve` downloads
(with byte ranges). Serves files from a directory per repo, on loopback; clients reach it with
HF_ENDPOINT (read by huggingface_hub when it is imported, so set it before the process starts).
Everything else (auth, uploads, listing trees, LFS/xet) is not emulated."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from support.net import free_port

SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit every repo is at


class HubStandIn:
    def __init__(self, root: Path) -> None:
        """root/<org>/<name>/<files>: the dataset repos."""
        self.root = root
        self.port = free_port()
        self.requests: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HubStandIn:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._get(self, head=False)

            def do_HEAD(self) -> None:
                hub._get(self, head=True)

            def do_POST(self) -> None:
                hub._post(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _repo(self, org: str, name: str) -> Path | None:
        repo = self.root / org / name
        return repo if repo.is_dir() else None

    def _json(self, handler: http.server.BaseHTTPRequestHandler, status: int, body: Any,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _missing(self, handler: http.server.BaseHTTPRequestHandler, what: str,
                 code: str = "RepoNotFound") -> None:
        self._json(handler, 404, {"error": what}, {"X-Error-Code": code,
                                                   "X-Error-Message": what})

    def _get(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        info = re.fullmatch(r"/api/datasets/([^/]+)/([^/]+)(?:/revision/([^/]+))?", path)
        if info:
            repo = self._repo(info[1], info[2])
            if repo is None:
                return self._missing(handler, f"dataset {info[1]}/{info[2]} not found")
            files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
            return self._json(handler, 200, {"id": f"{info[1]}/{info[2]}", "sha": SHA,
                                             "private": False, "siblings": [
                                                 {"rfilename": f} for f in files]})
        tree = re.fullmatch(r"/api/datasets/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if tree:
            repo = self._repo(tree[1], tree[2])
            folder = repo / (tree[4] or "") if repo else None
            if folder is None or not folder.is_dir():
                return self._missing(handler, f"{tree[4]} not found", "EntryNotFound")
            query = urllib.parse.parse_qs(urllib.parse.urlparse(handler.path).query)
            recursive = query.get("recursive", ["false"])[0] == "true"
            children = folder.rglob("*") if recursive else folder.iterdir()
            return self._json(handler, 200, [self._entry(repo, child)
                                             for child in sorted(children)])
        resolve = re.fullmatch(r"/datasets/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            repo = self._repo(resolve[1], resolve[2])
            file = repo / resolve[4] if repo else None
            if file is None or not file.is_file():
                return self._missing(handler, f"{resolve[4]} not found", "EntryNotFound")
            data = file.read_bytes()
            start, end = 0, len(data)
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", ""))
            if ranged:
                start = int(ranged[1])
                end = min(len(data), int(ranged[2]) + 1 if ranged[2] else len(data))
            body = data[start:end]
            handler.send_response(206 if ranged else 200)
            handler.send_header("Content-Length", str(len(body)))
            handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            handler.send_header("X-Repo-Commit", SHA)
            if ranged:
                handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            handler.end_headers()
            if not head:
                handler.wfile.write(body)
            return None
        return self._missing(handler, f"not emulated: {path}", "NotEmulated")

    def _post(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
        self.requests.append(f"POST {path}")
        length = int(handler.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(handler.rfile.read(length).decode())
        info = re.fullmatch(r"/api/datasets/([^/]+)/([^/]+)/paths-info/([^/]+)", path)
        repo = self._repo(info[1], info[2]) if info else None
        if repo is None:
            return self._missing(handler, f"not emulated: {path}", "NotEmulated")
        entries = [self._entry(repo, repo / wanted) for wanted in form.get("paths", [])
                   if (repo / wanted).exists()]
        return self._json(handler, 200, entries)

    @staticmethod
    def _entry(repo: Path, path: Path) -> dict[str, Any]:
        name = path.relative_to(repo).as_posix()
        if path.is_dir():
            return {"type": "directory", "path": name,
                    "oid": hashlib.sha1(name.encode()).hexdigest()}
        data = path.read_bytes()
        return {"type": "file", "path": name, "size": len(data),
                "oid": hashlib.sha1(data).hexdigest()}
