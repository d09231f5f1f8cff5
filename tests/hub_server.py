"""A stand-in for the Hugging Face Hub's HTTP API on loopback, for tests that publish with the real client.

It answers the endpoints that huggingface_hub 2.4's `whoami`, `create_repo`, `repo_info`, `create_branch`
and `upload_folder` call on the regular (non-Xet) path, the way the Hub does, and records what arrives:

    GET  /api/whoami-v2                                  who the bearer token belongs to
    GET  /api/agent-harnesses                            (404: the client's agent registry, for its user-agent)
    POST /api/repos/create                               {name, organization, visibility?}; 409 + url if it exists
    GET  /api/models/{repo}[/revision/{rev}]             repo_info (private flag, sha, siblings)
    POST /api/models/{repo}/branch/{branch}              create_branch
    POST /api/validate-yaml                              the README's metadata block
    POST /api/models/{repo}/preupload/{rev}              upload mode per file: "lfs" or "regular"
    POST /{repo}.git/info/lfs/objects/batch              LFS batch API: where to PUT each large file
    PUT  /_lfs/{sha256}                                  the storage URL the batch answer hands out
    POST /{repo}.git/info/lfs/objects/verify             LFS verify
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]   ndjson commit: inline base64 files + LFS pointers

and it serves repos that a test lays out (`hub.add_repo`) to the clients that read them, as `load_dataset(...,
streaming=True)` and `from_pretrained` read the Hub:

    GET  /api/{models,datasets}/{repo}[/revision/{rev}]  repo info: sha, siblings (with sizes), card data
    GET  /api/{models,datasets}/{repo}/tree/{rev}[/{path}][?recursive=true]   file listing
    POST /api/{models,datasets}/{repo}/paths-info/{rev}  what each named path is
    HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}     a file: ETag, X-Repo-Commit, and ranged reads (206),
                                                         which is how a Parquet file is streamed

Xet storage is chosen by the client, not offered by the server: huggingface_hub 2.4 uploads through Xet
whenever the `hf_xet` package is importable, and has no fallback when the Hub does not answer for it. So a
test that uses this server sets HF_HUB_DISABLE_XET=1, which is the regular path: preupload, LFS batch, PUT,
commit. The server is bounded: it serves at most `max_requests` requests and shuts itself down after
`lifetime_s` seconds even if a test never stops it.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import io
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# What the Hub puts in a new model repo: the LFS rules that send weights to LFS storage.
GITATTRIBUTES = b"".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n".encode() for p in (
    "*.bin", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.pt", "*.pth", "*.safetensors", "*.tar.gz", "*.zip"))
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub also sends any file over 10 MB to LFS


@functools.lru_cache(maxsize=256)  # a bytes object caches its own hash: a served file is hashed once, not per read
def git_blob_oid(content: bytes) -> str:
    """git's object id of a file: what the Hub reports as `oid` for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def hub_env(endpoint: str, home, token: str | None = None) -> dict[str, str]:
    """A user's environment with the Hub at `endpoint` and a cache of its own (nothing offline), for the real
    clients run in a subprocess. Xet off: the stand-in speaks the regular upload protocol (above)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONUNBUFFERED="1", **({"HF_TOKEN": token} if token else {}))
    return env


FINEWEB_EDU_README = b"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb-Edu (stand-in)
"""


def fineweb_edu_parquet(texts: list[str], first: int, row_group_size: int = 8) -> bytes:
    """FineWeb-Edu's columns, in row groups of `row_group_size` documents, as a reader finds them by ranged reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    table = pa.table({
        "text": texts, "id": [f"<urn:uuid:{first + i:08d}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{first + i}" for i in range(n)], "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n, "language_score": [0.95] * n, "token_count": [len(t.split()) for t in texts],
        "score": [3.2] * n, "int_score": [3] * n})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


@dataclass
class Repo:
    private: bool
    kind: str = "model"  # or "dataset"
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    lfs_paths: set[str] = field(default_factory=set)  # paths committed as LFS pointers
    commits: list[dict] = field(default_factory=list)
    pull_requests: int = 0

    def lfs_patterns(self) -> list[str]:
        text = self.refs["main"].get(".gitattributes", b"").decode()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]


class HubStandIn:
    """Start with `with HubStandIn(users) as hub:`; `hub.url` goes into HF_ENDPOINT.

    `users` maps a token to {"name": str, "role": "write" | "read", "orgs": [str]}. After the client ran,
    `hub.repos`, `hub.lfs`, `hub.created` (create-repo payloads) and `hub.requests` hold what it did.
    """

    def __init__(self, users: dict[str, dict], *, max_requests: int = 400, lifetime_s: float = 120.0):
        self.users = users
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, as PUT to the storage URL
        self.created: list[dict] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of each ranged read
        self.unhandled: list[tuple[str, str]] = []
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port, chosen by the OS
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = threading.Event()

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._timer.cancel()
            self.httpd.shutdown()
            self.httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, kind: str = "model") -> Repo:
        """A public repo holding `files` at main, committed once, as a publisher left it."""
        repo = Repo(private=False, kind=kind)
        repo.refs["main"].update(files)
        repo.commits.append({"oid": hashlib.sha1(repo_id.encode()).hexdigest(), "ref": "main", "summary": "add",
                             "paths": sorted(files)})
        self.repos[f"{kind}s/{repo_id}" if kind != "model" else repo_id] = repo
        return repo

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """The content of every file at `ref`, LFS files resolved to what was uploaded."""
        return dict(self.repos[repo_id].refs[ref])


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    timeout = 10  # a client that stalls mid-request cannot hold a thread for long

    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", r"/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", r"/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ]

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # --- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        with hub.lock:
            hub.requests.append((method, url.path))
            over_limit = len(hub.requests) > hub.max_requests
        if over_limit:
            self._body()
            return self._send(503, {"error": "stand-in request limit reached"})
        for verb, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, url.path)
            if verb == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with hub.lock:  # one request at a time changes the state
                    return getattr(self, name)(**args)
        self._body()
        with hub.lock:
            hub.unhandled.append((method, url.path))
        self._send(404, {"error": f"stand-in has no route for {method} {url.path}"})

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the CRLF after the last (empty) chunk
            return bytes(data)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self) -> dict:
        return json.loads(self._body() or b"{}")

    def _send(self, status: int, payload, headers: dict | None = None, content_type="application/json") -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        # The Hub puts its message in the body and in X-Error-Message, and a machine-readable X-Error-Code.
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self._send(status, {"error": message}, headers)

    def _user(self) -> dict | None:
        auth = self.headers.get("Authorization", "")
        return self.hub.users.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def _can_write(self, user: dict | None, namespace: str) -> bool:
        return bool(user) and user["role"] == "write" and namespace in (user["name"], *user.get("orgs", []))

    def _repo_for(self, repo_id: str, *, write: bool, create_pr: bool = False) -> Repo | None:
        """The repo if the caller may use it; otherwise the Hub's answer is sent and None returned."""
        user, repo, namespace = self._user(), self.hub.repos.get(repo_id), repo_id.split("/")[0]
        member = bool(user) and namespace in (user["name"], *user.get("orgs", []))
        if repo is None or (repo.private and not member):  # the Hub does not tell a private repo from a missing one
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        # Opening a pull request needs read access only; everything else that writes needs write access.
        if write and not create_pr and not self._can_write(user, namespace):
            self._error(403, f"You don't have write access to {repo_id}")
            return None
        return repo

    def _ref(self, repo: Repo, rev: str) -> dict[str, bytes] | None:
        if rev not in repo.refs:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return repo.refs[rev]

    # --- endpoints --------------------------------------------------------------------------------------

    def agent_harnesses(self):
        # The client fetches this registry once a day to name AI agents in its user-agent; none here, so none named.
        self._error(404, "not served by the stand-in")

    def whoami(self):
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(200, {"type": "user", "name": user["name"], "fullname": user["name"],
                         "orgs": [{"name": o, "type": "org"} for o in user.get("orgs", [])],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "stand-in", "role": user["role"]}}})

    def create_repo(self):
        payload, user = self._json(), self._user()
        self.hub.created.append(payload)
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        namespace = payload.get("organization") or user["name"]
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return self._error(400, "the stand-in serves model repos only")
        if not self._can_write(user, namespace):
            return self._error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.hub.repos:  # the Hub answers 409 with the repo's url (create_repo(exist_ok) reads it)
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _read(self, kind: str, repo: str, rev: str) -> tuple[Repo, dict[str, bytes], str] | None:
        """A repo's files at `rev` (a branch or a commit sha) and that commit's sha; else the Hub's 404 is sent."""
        found = self._repo_for(repo if kind.rstrip("/") in ("", "models") else f"datasets/{repo}", write=False)
        if found is None:
            return None
        sha = found.commits[-1]["oid"] if found.commits else "0" * 40
        files = self._ref(found, "main" if rev == sha else rev)
        return None if files is None else (found, files, sha)

    @staticmethod
    def _entry(path: str, content: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}

    def repo_info(self, repo, rev="main", kind="models"):
        if (read := self._read(kind, repo, rev)) is None:
            return
        found, files, sha = read
        card = {}
        if kind == "datasets" and (readme := files.get("README.md", b"").decode()).startswith("---"):
            card = yaml.safe_load(readme.split("---")[1]) or {}
        self._send(200, {"id": repo, "author": repo.split("/")[0], "sha": sha, "private": found.private,
                         "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
                         **({"cardData": card} if card else {})})

    def tree(self, kind, repo, rev, path=""):
        if (read := self._read(kind, repo, rev)) is None:
            return
        files, prefix = read[1], path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive") == ["true"] or self.query.get("recursive") == ["True"]
        entries, folders = [], set()
        for p, content in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._entry(p, content))
        if prefix and not entries and not folders:
            return self._error(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": git_blob_oid(f.encode())} for f in sorted(folders)]
        self._send(200, entries)

    def paths_info(self, kind, repo, rev):
        form = parse_qs(self._body().decode())
        if (read := self._read(kind, repo, rev)) is None:
            return
        files, answer = read[1], []
        for path in form.get("paths", []):
            if path in files:
                answer.append(self._entry(path, files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                answer.append({"type": "directory", "path": path, "oid": git_blob_oid(path.encode())})
        self._send(200, answer)

    def resolve(self, repo, rev, path, kind=""):
        if (read := self._read(kind, repo, rev)) is None:
            return
        files, sha = read[1], read[2]
        if path not in files:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        status, body = 200, content
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if ranged:  # a reader of Parquet asks for the footer, then for the row groups it reads
            self.hub.ranges.append((path, self.headers["Range"]))
            first, last = ranged.groups()
            start = int(first) if first else max(0, len(content) - int(last))
            end = min(int(last), len(content) - 1) if first and last else len(content) - 1
            if start >= len(content):
                headers["Content-Range"] = f"bytes */{len(content)}"
                return self._send_bytes(416, b"", headers)
            status, body = 206, content[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send_bytes(status, body, headers)

    def _send_bytes(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def create_branch(self, repo, branch):
        payload = self._json()
        found = self._repo_for(repo, write=True)
        if found is None:
            return
        if branch in found.refs:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        start = self._ref(found, payload.get("startingPoint", "main"))
        if start is not None:
            found.refs[branch] = dict(start)
            self._send(200, {})

    def validate_yaml(self):
        content = self._json().get("content", "")
        match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", content)
        errors = []
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            meta, errors = {}, [f"YAML: {e}"]
        if not isinstance(meta, dict):
            meta, errors = {}, ["metadata must be a YAML mapping"]
        for key in ("license", "library_name", "pipeline_tag"):
            if key in meta and not isinstance(meta[key], str):
                errors.append(f'"{key}" must be a string')
        for key in ("tags", "datasets", "language", "base_model"):
            value = meta.get(key, [])
            if not all(isinstance(v, str) for v in (value if isinstance(value, list) else [value])):
                errors.append(f'"{key}" must be a string or a list of strings')
        for entry in meta.get("model-index", []) or []:
            for result in entry.get("results", []) if isinstance(entry, dict) else [None]:
                if not (isinstance(result, dict) and {"task", "dataset", "metrics"} <= result.keys()
                        and all("type" in m and "value" in m for m in result["metrics"])):
                    errors.append('"model-index" results need task, dataset and metrics with type and value')
        if errors:
            return self._send(400, {"errors": [{"message": m} for m in errors], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo, rev):
        payload = self._json()
        create_pr = self.query.get("create_pr") == ["1"]
        found = self._repo_for(repo, write=True, create_pr=create_pr)
        if found is None or (files := self._ref(found, rev)) is None:
            return
        answers = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (any(fnmatch.fnmatch(f["path"], p) for p in found.lfs_patterns())
                   or f["size"] > LFS_SIZE_THRESHOLD or b"\0" in sample)
            old = files.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if f["path"] in found.lfs_paths
                                            else git_blob_oid(old))
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._send(200, {"files": answers, "commitOid": found.commits[-1]["oid"] if found.commits else "0" * 40})

    def lfs_batch(self, repo):
        payload = self._json()
        # A batch for a pull request names no ref: read access is enough then, as for preupload.
        found = self._repo_for(repo, write=True, create_pr="ref" not in payload)
        if found is None:
            return
        objects = []
        for obj in payload["objects"]:
            if self.hub.lfs.get(obj["oid"]) is not None and len(self.hub.lfs[obj["oid"]]) == obj["size"]:
                objects.append({"oid": obj["oid"], "size": obj["size"]})  # already stored: no action
            else:
                objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify"}}})
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "content does not match its sha256")
        self.hub.lfs[oid] = data
        self._send(200, {})

    def lfs_verify(self, repo):
        payload = self._json()
        stored = self.hub.lfs.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return self._error(404, f"object {payload['oid']} was not uploaded")
        self._send(200, {})

    def commit(self, repo, rev):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        create_pr = self.query.get("create_pr") == ["1"]
        found = self._repo_for(repo, write=True, create_pr=create_pr)
        if found is None or (base := self._ref(found, rev)) is None:
            return
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        if not header.get("summary"):
            return self._error(400, "commit summary is required")
        files, lfs_paths = dict(base), set(found.lfs_paths)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
                lfs_paths.add(value["path"])
            elif line["key"] in ("deletedFile", "deletedFolder"):
                files = {p: c for p, c in files.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
        if create_pr:
            found.pull_requests += 1
            ref = f"refs/pr/{found.pull_requests}"
        else:
            ref = rev
        found.refs[ref], found.lfs_paths = files, lfs_paths
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        found.commits.append({"oid": oid, "ref": ref, "summary": header["summary"],
                              "paths": [line["value"]["path"] for line in lines if line["key"] != "header"]})
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": f"{self.hub.url}/{repo}/discussions/{found.pull_requests}"
                         if create_pr else None})
