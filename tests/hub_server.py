"""A stand-in for the Hugging Face Hub on loopback: the few endpoints ``huggingface_hub``'s ``create_repo`` and
``upload_folder`` / ``create_commit`` call for an upload of small files, and a record of what arrived.

Read off huggingface_hub 2.x (``hf_api.py`` ``HfApi.create_repo``; ``_commit_api.py`` ``_fetch_upload_modes``,
``_prepare_commit_payload``, ``_send_commit``; ``_upload_pipeline.py``, the path ``upload_folder`` takes when
``hf_xet`` is installed):

- ``POST /api/repos/create`` ``{"name", "organization", "visibility", "type"}`` -> ``{"url"}``; 409 when it exists
  (``exist_ok=True`` accepts that);
- ``POST /api/validate-yaml`` ``{"content", "repoType"}`` (``HfApi._validate_yaml``, called for a README.md
  before anything is hashed) -> ``{"errors": [], "warnings": []}``, 400 with ``errors`` when the card's front
  matter is not a YAML mapping;
- ``POST /api/{type}s/{namespace}/{name}/preupload/{revision}`` ``{"files": [{"path", "sample", "size"}]}`` ->
  ``{"files": [{"path", "uploadMode": "regular" | "lfs", "shouldIgnore", "oid"}]}``. Every file here is
  "regular" (sent inside the commit, base64): "lfs" would send the client to the LFS / Xet storage protocol,
  which this server does not speak, so tests keep their files small;
- ``POST /api/{type}s/{namespace}/{name}/commit/{revision}``, NDJSON: a ``header`` line (``summary``,
  ``description``), then one ``file`` line per file (``content`` base64, ``path``, ``encoding``) ->
  ``{"commitUrl", "commitOid"}``.

Anything else is answered 404 and listed in ``HubServer.unexpected``. Use as a context manager::

    with HubServer() as hub:
        HfApi(endpoint=hub.endpoint).create_repo("me/x")
        hub.repos["me/x"].files  # {path: bytes}
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

_PREUPLOAD = re.compile(r"/api/(model|dataset|space)s/([^/]+/[^/]+)/preupload/([^/?]+)")
_COMMIT = re.compile(r"/api/(model|dataset|space)s/([^/]+/[^/]+)/commit/([^/?]+)")


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    visibility: Optional[str]
    files: Dict[str, bytes] = field(default_factory=dict)
    commits: List[dict] = field(default_factory=list)  # {"summary", "description", "oid", "paths"}


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]  # names in lower case
    body: bytes


class HubServer:
    """The stand-in Hub on ``127.0.0.1`` and a free port; ``endpoint`` is its base URL."""

    def __init__(self) -> None:
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Request] = []
        self.unexpected: List[Tuple[str, str]] = []
        self.validated: List[str] = []  # README.md contents sent to validate-yaml
        self.fail_commit_with: Optional[Tuple[int, str]] = None  # (status, message) to answer commits with
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _read(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", str(payload.get("error", "")))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_HEAD(self):
                self._handle("HEAD")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def _handle(self, method: str) -> None:
                body = self._read()
                path = self.path.split("?")[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub._lock:
                    hub.requests.append(Request(method, self.path, headers, body))
                try:
                    status, payload = hub._route(method, path, self.headers, body)
                except Exception as e:  # a bug here must show in the test, not hang the client
                    status, payload = 500, {"error": f"test hub: {type(e).__name__}: {e}"}
                self._send(status, payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle ----
    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- the endpoints ----
    def _route(self, method: str, path: str, headers, body: bytes):
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            with self._lock:
                if repo_id in self.repos:
                    return 409, {"error": "You already created this model repo", "url": self._url(repo_id)}
                self.repos[repo_id] = Repo(repo_id, req.get("type") or "model", req.get("visibility"))
            return 200, {"url": self._url(repo_id), "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            self.validated.append(content)
            errors = _front_matter_errors(content)
            return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": [],
                                              **({"error": errors[0]} if errors else {})}
        m = _PREUPLOAD.fullmatch(path)
        if method == "POST" and m:
            repo = self.repos.get(m.group(2))
            if repo is None:
                return 404, {"error": f"Repository not found: {m.group(2)}"}
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": None} for f in files], "commitOid": None}
        m = _COMMIT.fullmatch(path)
        if method == "POST" and m:
            repo = self.repos.get(m.group(2))
            if repo is None:
                return 404, {"error": f"Repository not found: {m.group(2)}"}
            if self.fail_commit_with is not None:
                status, message = self.fail_commit_with
                return status, {"error": message}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return 400, {"error": "commit: the first NDJSON line must be the header"}
            added = {}
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    if value.get("encoding") != "base64":
                        return 400, {"error": f"commit: {value.get('path')}: encoding {value.get('encoding')!r}"}
                    added[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    added[value["path"]] = None
                else:
                    return 422, {"error": f"commit: {item['key']} lines are not taken by this test hub "
                                          f"(regular uploads only)"}
            oid = hashlib.sha1(body).hexdigest()
            with self._lock:
                for p, content in added.items():
                    if content is None:
                        repo.files.pop(p, None)
                    else:
                        repo.files[p] = content
                repo.commits.append({**lines[0]["value"], "oid": oid, "paths": sorted(added)})
            return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self._url(repo.repo_id)}/commit/{oid}"}
        with self._lock:
            self.unexpected.append((method, path))
        return 404, {"error": f"test hub: no endpoint {method} {path}"}

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def _front_matter_errors(content: str) -> List[str]:
    """What the Hub would refuse in a card's front matter (the ``---`` block): not YAML, or not a mapping."""
    import yaml
    if not content.startswith("---\n"):
        return []  # no metadata: the Hub only warns
    end = content.find("\n---", 4)
    if end < 0:
        return ["README.md: the metadata block opened by '---' is never closed"]
    try:
        data = yaml.safe_load(content[4:end])
    except yaml.YAMLError as e:
        return [f"README.md: metadata is not valid YAML ({e})"]
    return [] if isinstance(data, dict) else ["README.md: metadata must be a YAML mapping"]
