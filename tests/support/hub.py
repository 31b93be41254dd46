"""A local stand-in for the Hugging Face Hub, on loopback, reached with HF_ENDPOINT (read by
huggingface_hub when it is imported, so set it before the process starts) or an `endpoint`
argument. It serves what huggingface_hub's calls send and expect (huggingface_hub 2.4):

- reads, for models and datasets: repo info (`/api/{type}s/{id}[/revision/{rev}]`, with
  siblings), tree listing, paths-info and `resolve` downloads (byte ranges, ETag,
  X-Repo-Commit), at any of a repo's branches or its commit shas;
- writes: `POST /api/repos/create` (visibility recorded), `/branch/{name}`,
  `/api/validate-yaml` (model cards), `/preupload/{rev}` and the NDJSON `/commit/{rev}`.
  preupload answers "regular" for every file, so commits carry the bytes base64-encoded;
  LFS and xet uploads (what the real Hub asks for weights, through hf_xet's CAS protocol) are
  not emulated, and an `lfsFile` line in a commit is refused;
- auth: writes need `Authorization: Bearer <token>` with a token of `tokens` (401 otherwise,
  403 outside the namespaces that token may write); a private repo is invisible (401, as the
  Hub answers) without a token of its namespace;
- failures on demand: `fail(method, path_regex, status, times)`.

Taken from huggingface_hub's own client code (2.4, read in the venv): create_repo with
exist_ok reads `url` from the body of a 409 (hf_api.py `create_repo`); `_fetch_upload_modes`
expects `files: [{path, uploadMode, shouldIgnore, oid}]` and skips a file whose `oid` equals
its local git blob id (`create_commit`); `_prepare_commit_payload`/`_send_commit` post a
`header` line then one `file` (base64) or `lfsFile` line per file and read `commitUrl`,
`commitOid`; `create_branch` posts `{startingPoint}` and treats 409 as "exists"; errors carry
`X-Error-Code`/`X-Error-Message` (utils/_http.py `hf_raise_for_status`).

Repos: `root/<org>/<name>/<files>` are dataset repos at main (the directory is read when the
stand-in starts); `put(...)` adds any repo or revision.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.net import free_port

MAIN = "main"
PREFIX = {"model": "", "dataset": "datasets/"}  # URL prefix of each repo type's downloads


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {MAIN: {}})

    def sha(self, revision: str) -> str:
        """A commit sha for a branch's content (distinct revisions, distinct shas)."""
        files = self.branches[revision]
        listing = json.dumps({p: hashlib.sha1(d).hexdigest() for p, d in sorted(files.items())})
        return hashlib.sha1(f"{revision}\n{listing}".encode()).hexdigest()

    def files_at(self, revision: str) -> dict[str, bytes] | None:
        if revision in self.branches:
            return self.branches[revision]
        return next((files for name, files in self.branches.items()
                     if self.sha(name) == revision), None)


def git_oid(data: bytes) -> str:
    """A regular file's git blob id, as huggingface_hub computes it to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Failure:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


class HubStandIn:
    def __init__(self, root: Path | None = None,
                 tokens: dict[str, tuple[str, ...]] | None = None) -> None:
        """root/<org>/<name>/<files>: dataset repos at main. tokens: token -> the namespaces
        (owners) it may write to and read privately."""
        self.root = root
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens = tokens or {}
        self.port = free_port()
        self.requests: list[str] = []  # "METHOD /path" of every request, in order
        self.created: list[dict[str, Any]] = []  # bodies of accepted /api/repos/create
        self.commits: list[dict[str, Any]] = []  # {repo, revision, paths, summary} accepted
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        if root is not None and root.is_dir():
            for repo in sorted(p for p in root.glob("*/*") if p.is_dir()):
                self.put("dataset", f"{repo.parent.name}/{repo.name}",
                         {f.relative_to(repo).as_posix(): f.read_bytes()
                          for f in repo.rglob("*") if f.is_file()})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put(self, repo_type: str, repo_id: str, files: dict[str, bytes],
            revision: str = MAIN, private: bool = False) -> None:
        """Set a repo's files at a branch (creating the repo and the branch)."""
        with self._lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(private=private))
            repo.branches[revision] = dict(files)

    def files(self, repo_type: str, repo_id: str, revision: str = MAIN) -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].branches[revision])

    def fail(self, method: str, path: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests matching `method` and the regex `path` with
        `status` (before anything else is checked)."""
        self.failures.append(Failure(method, re.compile(path), status, times))

    def __enter__(self) -> HubStandIn:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self)

            def do_HEAD(self) -> None:
                hub._handle(self)

            def do_POST(self) -> None:
                hub._handle(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- dispatch ------------------------------------------------------------------------

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlparse(handler.path)
        path = urllib.parse.unquote(url.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        self.requests.append(f"{handler.command} {path}")
        reply = Reply(handler)
        failure = self._failure(handler.command, path)
        if failure is not None:
            return reply.json(failure, {"error": "injected failure"},
                              {"X-Error-Message": f"injected {failure}"})
        query = urllib.parse.parse_qs(url.query)
        user = self._user(handler.headers.get("Authorization", ""))
        if user is False:
            return reply.error(401, "Invalid credentials in Authorization header",
                               "InvalidCredentials")
        for pattern, route in self._routes():
            match = re.fullmatch(pattern, f"{handler.command} {path}")
            if match:
                return route(reply, match, body, query, user)  # type: ignore[no-any-return]
        return reply.error(404, f"not emulated: {handler.command} {path}", "NotEmulated")

    def _routes(self) -> list[tuple[str, Any]]:
        kinds = r"(?P<type>model|dataset)s"
        repo = r"(?P<org>[^/]+)/(?P<name>[^/]+)"
        return [
            (r"POST /api/repos/create", self._create),
            (r"POST /api/validate-yaml", lambda r, *_: r.json(200, {"errors": [],
                                                                    "warnings": []})),
            (rf"POST /api/{kinds}/{repo}/branch/(?P<branch>.+)", self._branch),
            (rf"POST /api/{kinds}/{repo}/preupload/(?P<rev>.+)", self._preupload),
            (rf"POST /api/{kinds}/{repo}/commit/(?P<rev>.+)", self._commit),
            (rf"POST /api/{kinds}/{repo}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            (rf"GET /api/{kinds}/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            (rf"GET /api/{kinds}/{repo}(?:/revision/(?P<rev>[^/]+))?", self._info),
            (rf"(?:GET|HEAD) /(?P<type>datasets/)?{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)",
             self._resolve),
        ]

    def _failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for failure in self.failures:
                if failure.times > 0 and failure.method == method and failure.path.search(path):
                    failure.times -= 1
                    return failure.status
        return None

    def _user(self, authorization: str) -> tuple[str, ...] | bool | None:
        """The namespaces the request's token opens; None: no token; False: a wrong one."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        return self.tokens.get(token, False)

    def _visible(self, reply: Reply, match: re.Match[str],
                 user: Any) -> Repo | None:
        kind = "dataset" if match["type"] in ("dataset", "datasets/") else "model"
        repo = self.repos.get((kind, f"{match['org']}/{match['name']}"))
        if repo is None or (repo.private and match["org"] not in (user or ())):
            reply.error(404 if repo is None or user else 401, "Repository Not Found",
                        "RepoNotFound")
            return None
        return repo

    def _writable(self, reply: Reply, org: str, user: Any) -> bool:
        if user is None:
            reply.error(401, "Invalid username or password.", "Unauthorized")
            return False
        if org not in user:
            reply.error(403, f"You don't have the rights to create or write to {org}/*",
                        "Forbidden")
            return False
        return True

    # --- writes --------------------------------------------------------------------------

    def _create(self, reply: Reply, _: re.Match[str], body: bytes, query: Any,
                user: Any) -> None:
        request = json.loads(body)
        org, kind = request.get("organization") or "", request.get("type") or "model"
        if not self._writable(reply, org, user):
            return None
        repo_id = f"{org}/{request['name']}"
        with self._lock:
            if (kind, repo_id) in self.repos:  # the Hub's 409 names the repo's URL too
                message = "You already created this model repo"
                return reply.json(409, {"error": message, "url": self._url(kind, repo_id)},
                                  {"X-Error-Code": "RepoExists", "X-Error-Message": message})
            self.repos[(kind, repo_id)] = Repo(private=request.get("visibility") == "private")
            self.created.append(request)
        return reply.json(200, {"url": self._url(kind, repo_id), "name": repo_id})

    def _url(self, kind: str, repo_id: str) -> str:
        return f"{self.endpoint}/{PREFIX[kind]}{repo_id}"

    def _branch(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
                user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None or not self._writable(reply, match["org"], user):
            return None
        start = (json.loads(body) if body else {}).get("startingPoint") or MAIN
        with self._lock:
            if match["branch"] in repo.branches:
                return reply.error(409, "Reference already exists", "RefExists")
            repo.branches[match["branch"]] = dict(repo.files_at(start) or {})
        return reply.json(200, {})

    def _preupload(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
                   user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None or not self._writable(reply, match["org"], user):
            return None
        current = repo.files_at(match["rev"]) or {}
        return reply.json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_oid(current[f["path"]]) if f["path"] in current else None}
            for f in json.loads(body)["files"]]})

    def _commit(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
                user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None or not self._writable(reply, match["org"], user):
            return None
        if match["rev"] not in repo.branches:
            return reply.error(404, f"Invalid rev id: {match['rev']}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self._lock:
            files = dict(repo.branches[match["rev"]])
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] != "header":
                    return reply.error(400, f"not emulated: commit {line['key']}",
                                       "NotEmulated")
            repo.branches[match["rev"]] = files
            sha = repo.sha(match["rev"])
            self.commits.append({"repo": f"{match['org']}/{match['name']}",
                                 "revision": match["rev"], "summary": header["summary"],
                                 "paths": sorted(line["value"]["path"] for line in lines
                                                 if line["key"] == "file")})
        prefix = PREFIX["dataset" if match["type"] == "dataset" else "model"]
        return reply.json(200, {"commitUrl": f"{self.endpoint}/{prefix}{match['org']}/"
                                             f"{match['name']}/commit/{sha}",
                                "commitOid": sha, "pullRequestUrl": None})

    # --- reads ---------------------------------------------------------------------------

    def _info(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
              user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None:
            return None
        revision = match["rev"] or MAIN
        files = repo.files_at(revision)
        if files is None:
            return reply.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        name = next((n for n in repo.branches if repo.branches[n] is files), revision)
        return reply.json(200, {"id": f"{match['org']}/{match['name']}", "sha": repo.sha(name),
                                "private": repo.private,
                                "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
              user: Any) -> None:
        repo = self._visible(reply, match, user)
        files = repo.files_at(match["rev"]) if repo else None
        if repo is None:
            return None
        folder = (match["sub"] or "").strip("/")
        entries = self._entries(files or {}, folder, query.get("recursive") == ["true"])
        if files is None or (folder and not entries):
            return reply.error(404, f"{folder} not found", "EntryNotFound")
        return reply.json(200, entries)

    def _paths_info(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
                    user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None:
            return None
        files = repo.files_at(match["rev"]) or {}
        wanted = urllib.parse.parse_qs(body.decode()).get("paths", [])
        entries = []
        for path in wanted:
            path = path.strip("/")
            if path in files:
                entries.append(_file_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                entries.append(_dir_entry(path))
        return reply.json(200, entries)

    @staticmethod
    def _entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    name = prefix + "/".join(parts[:depth])
                    entries.setdefault(name, _dir_entry(name))
            if recursive or len(parts) == 1:
                entries[path] = _file_entry(path, data)
        return [entries[name] for name in sorted(entries)]

    def _resolve(self, reply: Reply, match: re.Match[str], body: bytes, query: Any,
                 user: Any) -> None:
        repo = self._visible(reply, match, user)
        if repo is None:
            return None
        files = repo.files_at(match["rev"])
        if files is None or match["file"] not in files:
            return reply.error(404, f"{match['file']} not found", "EntryNotFound")
        name = next((n for n in repo.branches if repo.branches[n] is files), match["rev"])
        return reply.file(files[match["file"]], repo.sha(name))


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}


def _dir_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


class Reply:
    def __init__(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        self.handler = handler

    def json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._send(status, data, {"Content-Type": "application/json", **(headers or {})})

    def error(self, status: int, message: str, code: str) -> None:
        self.json(status, {"error": message}, {"X-Error-Code": code,
                                               "X-Error-Message": message})

    def file(self, data: bytes, sha: str) -> None:
        start, end = 0, len(data)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.handler.headers.get("Range", ""))
        headers = {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": sha}
        if ranged:
            start = int(ranged[1])
            end = min(len(data), int(ranged[2]) + 1 if ranged[2] else len(data))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(206 if ranged else 200, data[start:end], headers)

    def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        handler = self.handler
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
