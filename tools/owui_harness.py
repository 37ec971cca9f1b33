"""Drive a real Open WebUI (installed from PyPI) for end-to-end tests and the demo.

Only the standard library and httpx are needed at import time. `OpenWebUIClient.chat_ui`
additionally imports python-socketio (with its asyncio client) when it is called.

Version differences handled here are marked with "# 0.6.28:" comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import httpx

TORCH_PIN = "torch==2.13.0"  # a local CPU wheel on the dev/CI machines; keeps pip off CUDA torch
STARTUP_TIMEOUT = 240.0


# ---------------------------------------------------------------- venv cache


def cache_dir() -> Path:
    base = os.environ.get("ORP_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "orp-owui"


def _log(msg: str) -> None:
    print(f"[owui-harness] {msg}", file=sys.stderr, flush=True)


def _venv_works(venv: Path) -> bool:
    if not (venv / "bin" / "open-webui").exists():
        return False
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import open_webui"],
        capture_output=True,
    )
    return probe.returncode == 0


def ensure_venv(version: str) -> Path:
    """Return a venv with open-webui==<version>, creating it (once, under a file lock) if needed."""
    venv = cache_dir() / f"owui-{version}"
    marker = venv / ".complete"
    if marker.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"owui-{version}.lock", "w") as lock:
        _log(f"waiting for the install lock of open-webui {version} ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another process finished it while we waited
            return venv
        if _venv_works(venv):  # installed by hand / an older run without the marker
            _log(f"adopting the existing install at {venv}")
            marker.write_text(version + "\n")
            return venv
        python = shutil.which("python3.11") or sys.executable
        _log(f"creating {venv} with {python}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        _log(f"pip install {TORCH_PIN} (CPU wheel; failure is ignored)")
        subprocess.run([*pip, TORCH_PIN], check=False)
        _log(f"pip install open-webui=={version} (this takes several minutes)")
        subprocess.run([*pip, f"open-webui=={version}"], check=True)
        if not _venv_works(venv):
            raise RuntimeError(f"open-webui {version} installed into {venv} but does not import")
        marker.write_text(version + "\n")
        _log(f"open-webui {version} ready")
    return venv


# ---------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(data_dir: Path, workers: int = 1) -> dict[str, str]:
    """Environment for a quick, offline, isolated start (OPEN_WEBUI_RUNTIME.md §9.1 plus extras)."""
    return {
        "DATA_DIR": str(data_dir / "data"),
        "STATIC_DIR": str(data_dir / "static"),
        "WEBUI_SECRET_KEY": secrets.token_urlsafe(32),
        "ENABLE_OLLAMA_API": "false",
        "ENABLE_OPENAI_API": "false",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAG_EMBEDDING_ENGINE": "openai",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
        "WHISPER_MODEL_AUTO_UPDATE": "false",
        "ENABLE_PIP_INSTALL_FRONTMATTER_REQUIREMENTS": "false",
        # 0.6.28 has no such switch and pip-installs `requirements:` on every load: keep it
        # off the network (and on par with 0.12, which installs nothing)
        "PIP_OPTIONS": "--no-index --disable-pip-version-check",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ENABLE_EVALUATION_ARENA_MODELS": "false",  # 0.6.28 defaults it on: an extra "arena-model"
        "UVICORN_WORKERS": str(workers),
        # no telemetry / analytics calls on a closed network
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class OpenWebUIServer:
    """`open-webui serve` in its own process group; a context manager."""

    def __init__(
        self,
        version: str,
        *,
        port: int | None = None,
        data_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        log_path: str | Path | None = None,
    ) -> None:
        self.version = version
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix=f"owui-{version}-")
        self.data_dir = Path(data_dir or self._tmp).resolve()
        self.extra_env = env or {}
        self.workers = workers
        self.log_path = Path(log_path) if log_path else self.data_dir / "server.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> OpenWebUIServer:
        venv = ensure_venv(self.version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **server_env(self.data_dir, self.workers), **self.extra_env}
        # a persistent data dir keeps its secret key, so sessions survive restarts
        key_file = self.data_dir / "secret_key"
        if not self._tmp and "WEBUI_SECRET_KEY" not in self.extra_env:
            if not key_file.exists():
                key_file.write_text(env["WEBUI_SECRET_KEY"])
            env["WEBUI_SECRET_KEY"] = key_file.read_text().strip()
        env.pop("VIRTUAL_ENV", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = [str(venv / "bin" / "open-webui"), "serve",
               "--host", "127.0.0.1", "--port", str(self.port)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,  # `.webui_secret_key` (if ever written) lands here, not in the repo
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills uvicorn workers too
        )
        log.close()
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        _log(f"open-webui {self.version} up at {self.base_url} in {self.startup_seconds:.1f}s")
        return self

    def _wait_healthy(self, t0: float) -> None:
        while time.monotonic() - t0 < STARTUP_TIMEOUT:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"open-webui {self.version} exited ({code}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"open-webui {self.version} not healthy after "
                           f"{STARTUP_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:  # stragglers left in the group (uvicorn workers, pip children)
            deadline = time.monotonic() + 5
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
                while time.monotonic() < deadline:
                    os.killpg(proc.pid, 0)  # raises once the group is gone
                    time.sleep(0.1)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> OpenWebUIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- client


def parse_sse(text: str) -> list[Any]:
    """`data:` payloads of an SSE body, JSON-decoded; `[DONE]` is kept as the string."""
    out: list[Any] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data:
            continue
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out


def content_chunks(events: list[Any]) -> list[str]:
    """The `delta.content` pieces of a streamed chat, in order."""
    return [c for c in _deltas(events, "content")]


def reasoning_chunks(events: list[Any]) -> list[str]:
    return [c for c in _deltas(events, "reasoning_content", "reasoning", "thinking")]


def _deltas(events: list[Any], *keys: str):
    for ev in events:
        if not isinstance(ev, dict):
            continue
        for choice in ev.get("choices") or []:
            delta = choice.get("delta") or {}
            for k in keys:
                if delta.get(k):
                    yield delta[k]
                    break


class OpenWebUIError(RuntimeError):
    pass


class OpenWebUIClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._version: str | None = None
        self.user_id = ""
        self.role = ""

    def close(self) -> None:
        self.http.close()

    # -- plumbing
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, ok=(200,), **kw) -> httpx.Response:
        r = self.http.request(method, path, headers=self._headers(), **kw)
        if ok and r.status_code not in ok:
            raise OpenWebUIError(f"{method} {path} -> {r.status_code}: {r.text[:500]}")
        return r

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = self.request("GET", "/api/config").json().get("version", "")
        return self._version

    @property
    def is_legacy(self) -> bool:
        """True for 0.6.x: socket event `chat-events`, no server-made chats, browser-side saves."""
        return tuple(int(p) for p in self.version.split(".")[:2]) < (0, 8)

    # -- auth
    def signup_admin(self, name: str, email: str, password: str) -> str:
        """Sign up (the first user becomes admin), or sign in if the account exists; -> JWT."""
        r = self.request("POST", "/api/v1/auths/signup", ok=(),
                         json={"name": name, "email": email, "password": password})
        if r.status_code != 200:
            r = self.request("POST", "/api/v1/auths/signin",
                             json={"email": email, "password": password})
        body = r.json()
        if body.get("role") != "admin":
            raise OpenWebUIError(f"{email} is {body.get('role')!r}, not admin (DB had users)")
        self.token = body["token"]
        return self.token

    def add_user(self, name: str, email: str, password: str, role: str = "user"
                 ) -> OpenWebUIClient:
        """As admin: create an account (or reuse it) and return a client signed in as it."""
        r = self.request("POST", "/api/v1/auths/add", ok=(),
                         json={"name": name, "email": email, "password": password,
                               "role": role})
        if r.status_code != 200 and "taken" not in r.text.lower():
            raise OpenWebUIError(f"adding {email} -> {r.status_code}: {r.text[:300]}")
        other = OpenWebUIClient(self.base_url)
        body = other.request("POST", "/api/v1/auths/signin",
                             json={"email": email, "password": password}).json()
        other.token = body["token"]
        other.user_id = body["id"]
        other.role = body.get("role", "")
        return other

    # -- functions
    def get_function(self, id: str) -> dict | None:
        r = self.request("GET", f"/api/v1/functions/id/{id}", ok=())
        return r.json() if r.status_code == 200 else None

    def create_function(self, id: str, name: str, content: str, description: str = "") -> dict:
        body = {"id": id, "name": name, "content": content, "meta": {"description": description}}
        return self.request("POST", "/api/v1/functions/create", json=body).json()

    def update_function(self, id: str, name: str, content: str, description: str = "") -> dict:
        body = {"id": id, "name": name, "content": content, "meta": {"description": description}}
        return self.request("POST", f"/api/v1/functions/id/{id}/update", json=body).json()

    def toggle_function(self, id: str) -> bool:
        return self.request("POST", f"/api/v1/functions/id/{id}/toggle").json()["is_active"]

    def ensure_active(self, id: str) -> None:
        fn = self.get_function(id)
        if fn is None:
            raise OpenWebUIError(f"function {id!r} does not exist")
        if not fn.get("is_active"):
            self.toggle_function(id)

    # -- workspace tools
    def create_tool(self, id: str, name: str, content: str, description: str = "") -> dict:
        """Create (or replace) a workspace tool from Python source (`class Tools`)."""
        body = {"id": id, "name": name, "content": content, "meta": {"description": description}}
        r = self.request("GET", f"/api/v1/tools/id/{id}", ok=())
        if r.status_code == 200:
            return self.request("POST", f"/api/v1/tools/id/{id}/update", json=body).json()
        return self.request("POST", "/api/v1/tools/create", json=body).json()

    # -- valves (a POST replaces the whole stored dict: always send the full set)
    def get_valves(self, id: str) -> dict:
        return self.request("GET", f"/api/v1/functions/id/{id}/valves").json() or {}

    def update_valves(self, id: str, valves: dict) -> dict:
        return self.request("POST", f"/api/v1/functions/id/{id}/valves/update", json=valves).json()

    def update_user_valves(self, id: str, valves: dict) -> dict:
        return self.request(
            "POST", f"/api/v1/functions/id/{id}/valves/user/update", json=valves
        ).json()

    # -- models and chat
    def list_models(self, refresh: bool = True) -> list[dict]:
        params = {"refresh": "true"} if refresh else None
        return self.request("GET", "/api/models", params=params).json()["data"]

    def chat(self, model: str, messages: list[dict], stream: bool = False,
             **extra: Any) -> tuple[int, Any]:
        """Plain-HTTP chat (no chat_id): returns (status, list of SSE payloads | JSON | text)."""
        body = {"model": model, "messages": messages, "stream": stream, **extra}
        r = self.request("POST", "/api/chat/completions", ok=(), json=body)
        ctype = r.headers.get("content-type", "")
        if "text/event-stream" in ctype:
            return r.status_code, parse_sse(r.text)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def chat_stream(self, model: str, messages: list[dict], **extra):
        """Yield SSE payloads of a streamed plain-HTTP chat as they arrive."""
        body = {"model": model, "messages": messages, "stream": True, **extra}
        headers = self._headers()
        with self.http.stream("POST", "/api/chat/completions", json=body, headers=headers) as r:
            for line in r.iter_lines():
                yield from parse_sse(line)

    def generate_title(self, model: str, messages: list[dict], **extra) -> tuple[int, Any]:
        """The title task (same path on 0.6.28 and 0.12.4); returns (status, JSON)."""
        body = {"model": model, "messages": messages, **extra}
        r = self.request("POST", "/api/v1/tasks/title/completions", ok=(), json=body)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def get_chat(self, chat_id: str) -> dict:
        return self.request("GET", f"/api/v1/chats/{chat_id}").json()

    # -- files (same endpoints in 0.6.28 and 0.12.4)
    def upload_file(self, filename: str, data: bytes, content_type: str, *,
                    process: bool = False) -> dict:
        """POST /api/v1/files/ (multipart, like the browser); -> the stored FileModel.

        `process=False` skips Open WebUI's own extraction/embedding (the e2e servers run
        offline with no embedding engine)."""
        r = self.request("POST", "/api/v1/files/", params={"process": str(process).lower()},
                         files={"file": (filename, data, content_type)})
        return r.json()

    def get_file_content(self, file_id: str) -> bytes:
        return self.request("GET", f"/api/v1/files/{file_id}/content").content

    @staticmethod
    def chat_file(uploaded: dict) -> dict:
        """A message/chat `files` item for an uploaded file, shaped like the browser's."""
        meta = uploaded.get("meta") or {}
        ctype = meta.get("content_type") or ""
        kind = "image" if ctype.startswith("image/") else "file"
        return {"type": kind, "file": uploaded, "id": uploaded["id"],
                "url": f"/api/v1/files/{uploaded['id']}/content" if kind == "image"
                else f"/api/v1/files/{uploaded['id']}",
                "name": meta.get("name") or uploaded.get("filename"), "status": "uploaded",
                "size": meta.get("size"), "content_type": ctype, "error": "",
                "collection_name": f"file-{uploaded['id']}", "itemId": str(uuid.uuid4())}

    def chat_ui(self, model: str, prompt: str, *, timeout: float = 120,
                files: list[dict] | None = None, follow: dict | None = None,
                **extra) -> dict:
        """Send a chat the way the browser does (socket.io session, server-side storage).

        Waits until the assistant message is finished and returns the stored chat
        (`GET /api/v1/chats/{id}`) with `_message_id` (the assistant message id) and
        `_events` (the socket events received for it) added. `files` (items from
        `chat_file`) are attached like the browser does: on the stored user message, as
        `image_url` parts of its content (images), and in the request's `files` (others).
        `follow` (a chat returned by `chat_ui`) continues that chat after its last assistant
        message instead of starting a new one.
        """
        if files:
            extra = {**extra, "_files": files}
        result: dict = {}

        def runner() -> None:
            try:
                result["chat"] = asyncio.run(
                    self._chat_ui(model, prompt, timeout, extra, follow))
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e

        t = threading.Thread(target=runner, daemon=True)  # works from sync and async tests alike
        t.start()
        t.join(timeout + 30)
        if "error" in result:
            raise result["error"]
        if "chat" not in result:
            raise TimeoutError("chat_ui did not finish")
        return result["chat"]

    async def _chat_ui(self, model: str, prompt: str, wait_s: float, extra: dict,
                       follow: dict | None = None) -> dict:
        import socketio  # python-socketio[asyncio_client]

        legacy = self.is_legacy
        files = extra.pop("_files", None) or []
        user_id, msg_id = str(uuid.uuid4()), str(uuid.uuid4())
        now = int(time.time())
        events: list[dict] = []
        finished, titled = asyncio.Event(), asyncio.Event()

        assistant: dict = {}  # 0.6.28 only: the browser-side copy of the assistant message
        loop = asyncio.get_running_loop()

        def on_event(ev: dict) -> None:
            if not isinstance(ev, dict) or ev.get("message_id") != msg_id:
                return
            events.append(ev)
            data = ev.get("data") or {}
            kind, payload = data.get("type"), data.get("data")
            if legacy:
                _apply_legacy_event(assistant, kind, payload)
            if kind == "chat:title":
                titled.set()
            if kind == "chat:completion" and isinstance(payload, dict):
                if payload.get("done"):
                    finished.set()
                elif payload.get("error"):
                    # 0.12 stops after an error event; 0.6.28 still sends a final `done` event
                    loop.call_later(0 if not legacy else 5, finished.set)
            elif kind == "chat:message:error":
                loop.call_later(0 if not legacy else 5, finished.set)

        sio = socketio.AsyncClient(reconnection=False)
        sio.on("events", on_event)  # 0.8+ event name
        sio.on("chat-events", on_event)  # 0.6.28: the socket event is still called "chat-events"
        await sio.connect(
            self.base_url,
            socketio_path="/ws/socket.io",
            auth={"token": self.token},
            transports=["websocket"],
            wait_timeout=30,
        )
        try:
            await sio.call("user-join", {"auth": {"token": self.token}}, timeout=30)
            # the namespace sid, not sio.sid (the engine.io id): the server routes events by it
            session_id = sio.get_sid()
            parent_id = follow["_message_id"] if follow else None
            user_message = {
                "id": user_id, "parentId": parent_id, "childrenIds": [msg_id], "role": "user",
                "content": prompt, "timestamp": now, "models": [model],
                **({"files": files} if files else {}),
            }
            images = [{"type": "image_url", "image_url": {"url": f["url"]}}
                      for f in files if f.get("type") == "image"]
            body: dict = {
                "model": model,
                "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                          *images] if images else prompt}],
                **({"files": [f for f in files if f.get("type") != "image"]}
                   if any(f.get("type") != "image" for f in files) else {}),
                "stream": True,
                "session_id": session_id,
                "id": msg_id,
                "features": {},
                "variables": {},
                "params": {},
                "background_tasks": {"title_generation": True, "tags_generation": False,
                                     "follow_up_generation": False},
                **extra,
            }
            if follow is not None:
                history = _follow_up(self, follow, user_message, body, model, legacy, assistant)
            elif legacy:
                # 0.6.28: the server cannot create the chat; the UI creates it first, then
                # sends chat_id + id + session_id (all three switch the server to async mode).
                assistant.update({
                    "id": msg_id, "parentId": user_id, "childrenIds": [], "role": "assistant",
                    "content": "", "model": model, "modelName": model, "modelIdx": 0,
                    "timestamp": now,
                })
                history = {"currentId": msg_id,
                           "messages": {user_id: user_message, msg_id: assistant}}
                new = self.request("POST", "/api/v1/chats/new", json={"chat": {
                    "title": "New Chat", "models": [model], "params": {}, "files": [],
                    "messages": [user_message, assistant], "history": history,
                    "tags": [], "timestamp": now * 1000,
                }}).json()
                body["chat_id"] = new["id"]
            else:
                # 0.12: parent_id null + user_message and no chat_id -> the server creates the chat
                body["parent_id"] = None
                body["user_message"] = user_message
            r = await asyncio.to_thread(
                self.request, "POST", "/api/chat/completions", ok=(), json=body
            )
            is_json = r.headers.get("content-type", "").startswith("application/json")
            reply = r.json() if is_json else None
            if r.status_code != 200 or not isinstance(reply, dict) or not reply.get("status"):
                raise OpenWebUIError(f"chat_ui POST -> {r.status_code}: {r.text[:500]}")
            chat_id = body.get("chat_id") or reply.get("chat_id")
            try:
                await asyncio.wait_for(finished.wait(), wait_s)
            except TimeoutError:
                raise TimeoutError(f"no final event for {msg_id}; got {events!r}"[:2000]) from None
            if legacy and (body.get("background_tasks") or {}).get("title_generation"):
                # 0.6.28 writes the title (a read-modify-write of the whole chat) after `done`;
                # saving before it lands could be reverted, so wait for `chat:title` first.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(titled.wait(), 15)
        finally:
            await sio.disconnect()
        if legacy:
            # 0.6.28: the server stores only the content; usage, error, done, sources and
            # statusHistory are stored by the browser, which POSTs the whole history at the end.
            # Do the same so the stored chat matches what a real user would have.
            await asyncio.to_thread(self._legacy_save, chat_id, model, session_id, history)
        chat = await asyncio.to_thread(self._wait_stored, chat_id, msg_id)
        chat["_message_id"] = msg_id
        chat["_events"] = events
        return chat

    def _legacy_save(self, chat_id: str, model: str, session_id: str, history: dict) -> None:
        msgs = [history["messages"][m] for m in history["messages"]]
        assistant = history["messages"][history["currentId"]]
        if not assistant.get("error"):  # the browser's chatCompletedHandler (outlet filters)
            r = self.request("POST", "/api/chat/completed", ok=(), json={
                "model": model, "chat_id": chat_id, "session_id": session_id,
                "id": assistant["id"],
                "messages": [{k: m[k] for k in ("id", "role", "content", "timestamp", "usage",
                                                "sources") if k in m} for m in msgs],
            })
            if r.status_code == 200:
                for m in (r.json() or {}).get("messages") or []:
                    if m.get("id") in history["messages"]:
                        history["messages"][m["id"]].update(m)
        self.request("POST", f"/api/v1/chats/{chat_id}", json={"chat": {
            "models": [model], "history": history, "messages": msgs, "params": {}, "files": [],
        }})

    def _wait_stored(self, chat_id: str, msg_id: str, timeout: float = 15) -> dict:
        """The final event can race the DB write: poll until the stored message is final."""
        deadline = time.monotonic() + timeout
        while True:
            chat = self.get_chat(chat_id)
            msg = chat["chat"]["history"]["messages"].get(msg_id) or {}
            if msg.get("done") or msg.get("error") or time.monotonic() > deadline:
                return chat
            time.sleep(0.3)


_LEGACY_STRIPPED = re.compile(
    r'<details\s+type="(?:reasoning|code_interpreter)"[^>]*>.*?</details>', re.DOTALL | re.I)
_LEGACY_TOOL_CARD = re.compile(r'<details\s+type="tool_calls"([^>]*)>[\s\S]*?</details>', re.I)


def legacy_history_text(content: str) -> str:
    """What the 0.6.28 browser sends for an assistant message (its `processDetails`):
    reasoning/code blocks removed, each tool card replaced by `"<result attribute>"`."""
    content = _LEGACY_STRIPPED.sub("", content)

    def result(card: re.Match) -> str:
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', card.group(0)))
        return f'"{attrs.get("result", "undefined")}"'

    return _LEGACY_TOOL_CARD.sub(result, content)


def _follow_up(client: OpenWebUIClient, follow: dict, user_message: dict, body: dict,
               model: str, legacy: bool, assistant: dict) -> dict:
    """Continue a stored chat after its last assistant message, as the browser does.

    0.12: the server loads the history from its DB (`chat_id` + `parent_id` + `user_message`).
    0.6.28: the browser saves the grown history first and sends the messages itself, with
    reasoning/code blocks stripped from assistant content (`FE06 lib/utils/index.ts`).
    """
    chat_id, parent_id = follow["id"], follow["_message_id"]
    history = copy.deepcopy(follow["chat"]["history"])
    chain, cur = [], parent_id
    while cur:
        chain.insert(0, history["messages"][cur])
        cur = history["messages"][cur].get("parentId")
    sent = [{"role": m["role"], "content": m.get("content", "")} for m in chain]
    if legacy:
        for m in sent:
            if m["role"] == "assistant":
                m["content"] = legacy_history_text(m["content"])
    body["chat_id"] = chat_id
    body["messages"] = [*sent, {"role": "user", "content": user_message["content"]}]
    body["background_tasks"] = {}  # the title was made on the first turn
    if not legacy:
        body["parent_id"] = parent_id
        body["user_message"] = user_message
        return history
    msg_id = user_message["childrenIds"][0]
    assistant.update({
        "id": msg_id, "parentId": user_message["id"], "childrenIds": [], "role": "assistant",
        "content": "", "model": model, "modelName": model, "modelIdx": 0,
        "timestamp": user_message["timestamp"]})
    history["messages"][parent_id].setdefault("childrenIds", []).append(user_message["id"])
    history["messages"][user_message["id"]] = user_message
    history["messages"][msg_id] = assistant
    history["currentId"] = msg_id
    msgs = [*chain, user_message, assistant]
    client.request("POST", f"/api/v1/chats/{chat_id}", json={"chat": {
        "models": [model], "history": history, "messages": msgs, "params": {}, "files": []}})
    return history


def _apply_legacy_event(message: dict, kind: str | None, data: Any) -> None:
    """What the 0.6.28 browser does to its copy of the assistant message for each socket event."""
    if kind == "chat:completion" and isinstance(data, dict):
        if data.get("error"):
            err = data["error"]  # the browser's handleOpenAIError
            if not isinstance(err, dict):
                text = str(err)
            elif "detail" in err:
                text = err["detail"]
            elif "error" in err:
                inner = err["error"]
                text = inner.get("message", inner) if isinstance(inner, dict) else inner
            else:
                text = err.get("message", "")
            message["error"] = {"content": f"Uh-oh! There was an issue with the response.\n{text}"}
            message["done"] = True
        if data.get("sources") and not message.get("sources"):
            message["sources"] = data["sources"]
        if data.get("content"):
            message["content"] = data["content"]
        if data.get("usage"):
            message["usage"] = data["usage"]
        if data.get("done"):
            message["done"] = True
    elif kind == "status":
        message.setdefault("statusHistory", []).append(data)
    elif kind in ("chat:message:delta", "message"):
        message["content"] = message.get("content", "") + (data or {}).get("content", "")
    elif kind in ("chat:message", "replace"):
        message["content"] = (data or {}).get("content", "")
    elif kind in ("chat:message:files", "files"):
        message["files"] = (data or {}).get("files")
    elif kind == "chat:message:error":
        message["error"] = (data or {}).get("error")
    elif kind == "chat:message:follow_ups":
        message["followUps"] = (data or {}).get("follow_ups")
    elif kind in ("source", "citation") and (data or {}).get("type") != "code_execution":
        message.setdefault("sources", []).append(data)


def stored_message(chat: dict, msg_id: str | None = None) -> dict:
    """The assistant message of a chat returned by `chat_ui`."""
    return chat["chat"]["history"]["messages"][msg_id or chat["_message_id"]]


# ---------------------------------------------------------------- pipe install


def install_pipe(
    client: OpenWebUIClient,
    pipe_path: str | Path,
    valves: dict,
    function_id: str = "openrouter",
    name: str = "OpenRouter",
    description: str = "OpenRouter Responses API manifold",
) -> dict:
    """Create (or update) the pipe function, activate it and store the full valve set."""
    content = Path(pipe_path).read_text()
    if client.get_function(function_id) is None:
        fn = client.create_function(function_id, name, content, description)
    else:
        fn = client.update_function(function_id, name, content, description)
    client.ensure_active(function_id)
    client.update_valves(function_id, valves)
    return fn
