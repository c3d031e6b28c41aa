"""A local stand-in for the Hugging Face Hub API: just the endpoints huggingface_hub's real create_repo,
upload_folder (preupload + NDJSON commit), repo_info, list_repo_tree and hf_hub_download call.

Writes need a bearer token, as on the Hub. Every file is declared a "regular" upload in preupload, so the client sends it base64-encoded inside the
commit (no LFS or Xet transfer). Repos live in memory; each commit gets a 40-hex sha.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    private: bool = False

    def files(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return None
        if rev == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == rev), None)


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """Run with `with HubStandIn() as hub: ...`; `hub.url` is the endpoint; `hub.requests` logs calls."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.cards: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- routes -----------------------------------------------------------------------------------
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}"}

    def preupload(self, repo: str, body: dict) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in body["files"]
        ]
        return 200, {"files": files}

    def commit(self, repo: str, rev: str, raw: bytes) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the first NDJSON line must be the commit header"}
        with self._lock:
            previous = self.repos[repo].files(rev)
            files = dict(previous[1]) if previous else {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return 400, {"error": f"the stand-in only takes regular files, got {line['key']}"}
            history = self.repos[repo].commits
            state = [repo, len(history), sorted((p, _blob_sha(d)) for p, d in files.items())]
            sha = hashlib.sha1(json.dumps(state).encode()).hexdigest()
            history.append((sha, files))
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def info(self, repo: str, rev: str) -> tuple[int, dict]:
        found = self.repos.get(repo)
        snapshot = found.files(rev) if found else None
        if snapshot is None:
            return 404, {"error": "Repository not found"}
        sha, files = snapshot
        siblings = [{"rfilename": p} for p in sorted(files)]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": found.private, "siblings": siblings}

    def tree(self, repo: str, rev: str) -> tuple[int, list | dict]:
        found = self.repos.get(repo)
        snapshot = found.files(rev) if found else None
        if snapshot is None:
            return 404, {"error": "Repository not found"}
        files = snapshot[1]
        return 200, [
            {"type": "file", "path": p, "size": len(d), "oid": _blob_sha(d)} for p, d in sorted(files.items())
        ]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body, headers: dict | None = None, head: bool = False):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if status >= 400:  # as the Hub does: huggingface_hub maps these to its error classes
                    message = body.get("error", "") if isinstance(body, dict) else ""
                    self.send_header("X-Error-Message", message)
                    if message == "Repository not found":
                        self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _route(self, method: str):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((method, path))
                if method == "POST" and not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if method == "POST" and path == "/api/repos/create":
                    return self._send(*hub.create_repo(json.loads(self._body())))
                if method == "POST" and path == "/api/validate-yaml":
                    hub.cards.append(json.loads(self._body())["content"])
                    return self._send(200, {"errors": [], "warnings": []})
                if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/{_REV}", path):
                    return self._send(*hub.preupload(m["repo"], json.loads(self._body())))
                if m := re.fullmatch(rf"/api/models/{_REPO}/commit/{_REV}", path):
                    return self._send(*hub.commit(m["repo"], m["rev"], self._body()))
                if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/{_REV})?", path):
                    return self._send(*hub.info(m["repo"], m["rev"] or "main"))
                if m := re.fullmatch(rf"/api/models/{_REPO}/tree/{_REV}", path):
                    return self._send(*hub.tree(m["repo"], m["rev"]))
                if m := re.fullmatch(rf"/{_REPO}/resolve/{_REV}/(?P<file>.+)", path):
                    return self._file(m["repo"], m["rev"], m["file"], head=method == "HEAD")
                return self._send(404, {"error": f"the stand-in has no route for {method} {path}"})

            def _file(self, repo: str, rev: str, name: str, head: bool):
                found = hub.repos.get(repo)
                snapshot = found.files(rev) if found else None
                if snapshot is None or name not in snapshot[1]:
                    code = "EntryNotFound" if snapshot else "RepoNotFound"
                    return self._send(404, {"error": "not found"}, {"X-Error-Code": code}, head=head)
                sha, files = snapshot
                data = files[name]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{_blob_sha(data)}"'}
                return self._send(200, data, headers, head=head)

            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

            def do_POST(self):
                self._route("POST")

        return Handler
