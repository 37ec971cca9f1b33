"""install()/uninstall(): put a fake ``open_webui`` package into ``sys.modules``.

The stub modules are ordinary source files under ``flavours/<flavour>/open_webui/``
(falling back to ``flavours/common/open_webui/``), laid out like the real package and
served by a meta-path finder, so ``import open_webui.models.users`` inside a pipe works
exactly as on a server.  Like the real ``open_webui.env`` they read ``DATA_DIR``,
``DATABASE_URL``, ``WEBUI_SECRET_KEY`` (and any other real variable) from the
environment at import time; ``install()`` sets those and ``uninstall()`` restores them.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

FLAVOURS = ("sync", "async")
FLAVOUR_VERSIONS = {"sync": "0.6.28", "async": "0.12.4"}

_FLAVOUR_ROOT = Path(__file__).resolve().parent / "flavours"

# Imported eagerly by install(); every module the brief names.
STUB_MODULES = {
    "sync": (
        "open_webui",
        "open_webui.env",
        "open_webui.config",
        "open_webui.constants",
        "open_webui.internal.db",
        "open_webui.models.users",
        "open_webui.models.files",
        "open_webui.models.chats",
        "open_webui.models.models",
        "open_webui.models.groups",
        "open_webui.storage.provider",
        "open_webui.routers.files",
        "open_webui.utils.misc",
        "open_webui.utils.access_control",
    ),
    "async": (
        "open_webui",
        "open_webui.env",
        "open_webui.config",
        "open_webui.constants",
        "open_webui.internal.db",
        "open_webui.models.users",
        "open_webui.models.files",
        "open_webui.models.chats",
        "open_webui.models.config",
        "open_webui.models.access_grants",
        "open_webui.models.models",
        "open_webui.models.groups",
        "open_webui.storage.provider",
        "open_webui.routers.files",
        "open_webui.utils.misc",
        "open_webui.utils.json_codec",
        "open_webui.utils.access_control.files",
    ),
}

_STATE: dict[str, Any] = {"handle": None}


class _StubFinder(importlib.abc.MetaPathFinder):
    """Resolve ``open_webui[.x.y]`` to the flavour tree, then the common tree."""

    def __init__(self, roots: list[Path]):
        self.roots = roots

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "open_webui" and not fullname.startswith("open_webui."):
            return None
        parts = fullname.split(".")
        package_dirs = [root.joinpath(*parts) for root in self.roots]
        package_dirs = [d for d in package_dirs if d.is_dir()]
        for root in self.roots:
            init = root.joinpath(*parts, "__init__.py")
            if init.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[str(d) for d in package_dirs]
                )
        for root in self.roots:
            module_file = root.joinpath(*parts[:-1], parts[-1] + ".py")
            if module_file.is_file():
                return importlib.util.spec_from_file_location(fullname, module_file)
        return None


def _is_stub_name(name: str) -> bool:
    return name == "open_webui" or name.startswith("open_webui.")


# --------------------------------------------------------------------------- users


def make_user(flavour: str, id: str = "user-1", **fields: Any) -> dict:
    """A complete ``UserModel``-shaped dict for ``flavour`` (only the real field names).

    Unknown keys raise ``TypeError`` so tests cannot rely on fields a version lacks.
    """
    now = int(time.time())
    base: dict[str, Any] = {
        "id": id,
        "name": fields.pop("name", f"User {id}"),
        "email": fields.pop("email", f"{id}@example.com"),
        "role": fields.pop("role", "user"),
        "last_active_at": now,
        "updated_at": now,
        "created_at": now,
    }
    if flavour == "sync":
        base["profile_image_url"] = fields.pop("profile_image_url", "/user.png")
        allowed = {"username", "bio", "gender", "date_of_birth", "info", "settings", "api_key",
                   "oauth_sub", "last_active_at", "updated_at", "created_at"}
    else:
        allowed = {"username", "profile_image_url", "profile_banner_image_url", "bio", "gender",
                   "date_of_birth", "timezone", "presence_state", "status_emoji", "status_message",
                   "status_expires_at", "info", "variables", "settings", "oauth", "scim",
                   "last_active_at", "updated_at", "created_at"}
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(f"UserModel of the {flavour!r} flavour has no field(s) {sorted(unknown)}")
    base.update(fields)
    return base


# --------------------------------------------------------------------------- handle


class StubHandle:
    """What ``install()`` returns: the live stub modules plus seeding helpers."""

    def __init__(self, flavour: str, data_dir: Path, database_url: str,
                 modules: dict[str, ModuleType], env_backup: dict[str, str | None],
                 finder: _StubFinder):
        self.flavour = flavour
        self.version = FLAVOUR_VERSIONS[flavour]
        self.data_dir = data_dir
        self.database_url = database_url
        self.modules = modules
        self._env_backup = env_backup
        self._finder = finder
        self.installed = True

    # -- convenience accessors --------------------------------------------------------
    @property
    def upload_dir(self) -> Path:
        return Path(self.modules["open_webui.config"].UPLOAD_DIR)

    @property
    def db(self) -> ModuleType:
        return self.modules["open_webui.internal.db"]

    @property
    def async_driver(self) -> str | None:
        """``"aiosqlite"``, ``"sync-fallback"`` (async flavour) or ``None`` (sync flavour)."""
        return getattr(self.db, "STUB_ASYNC_DRIVER", None)

    @property
    def UserModel(self) -> Any:
        return self.modules["open_webui.models.users"].UserModel

    # -- seeding (synchronous in both flavours; uses the sync engine) -------------------
    def add_user(self, id: str, role: str = "user", name: str | None = None,
                 email: str | None = None, **fields: Any) -> Any:
        """Insert a user row and return it as the flavour's ``UserModel``."""
        users = self.modules["open_webui.models.users"]
        data = make_user(self.flavour, id, role=role, name=name or f"User {id}",
                         email=email or f"{id}@example.com", **fields)
        model = users.UserModel(**data)
        with self.db.get_db() as session:
            session.add(users.User(**model.model_dump()))
            session.commit()
        return model

    def share_model(self, model_id: str, owner: str = "admin-0") -> None:
        """0.6.28 flavour: a model record every user may read (`access_control` None), as an
        admin makes in Admin → Models; ordinary users reach a pipe model only through one."""
        if self.flavour != "sync":
            raise NotImplementedError("the async Models API is awaited: seed it in the test")
        models = self.modules["open_webui.models.models"]
        form = models.ModelForm(id=model_id, base_model_id=None, name=model_id,
                                meta=models.ModelMeta(), params=models.ModelParams(),
                                access_control=None)
        models.Models.insert_new_model(form, owner)

    def add_chat(self, id: str | None = None, user_id: str = "user-1", title: str = "New Chat",
                 messages: list[dict] | None = None, chat: dict | None = None,
                 **fields: Any) -> Any:
        """Insert a chat row and return it as the flavour's ``ChatModel``.

        ``messages`` (each with an ``id``) become ``chat.history.messages`` linked in order
        (``parentId``/``childrenIds``), ``currentId`` = the last one, and also the legacy
        ``chat.messages`` list, as the frontend stores them.  Pass ``chat`` instead to store
        a raw chat JSON.
        """
        chats = self.modules["open_webui.models.chats"]
        chat_id = id or str(uuid.uuid4())
        if chat is None:
            history: dict[str, Any] = {"messages": {}, "currentId": None}
            parent = None
            for raw in messages or []:
                msg = {"parentId": parent, "childrenIds": [], "timestamp": int(time.time()), **raw}
                history["messages"][msg["id"]] = msg
                if parent is not None:
                    history["messages"][parent]["childrenIds"].append(msg["id"])
                parent = msg["id"]
            history["currentId"] = parent
            chat = {"title": title, "models": [], "messages": list(history["messages"].values()),
                    "history": history}
        now = int(time.time())
        values: dict[str, Any] = {"id": chat_id, "user_id": user_id,
                                  "title": chat.get("title", title), "chat": chat,
                                  "created_at": now, "updated_at": now, **fields}
        if self.flavour == "async":
            values.setdefault("current_message_id", (chat.get("history") or {}).get("currentId"))
        model = chats.ChatModel(**values)
        with self.db.get_db() as session:
            session.add(chats.Chat(**model.model_dump()))
            session.commit()
        return model

    def get_chat(self, id: str) -> Any:
        """Read a chat back synchronously (for assertions) as ``ChatModel`` or ``None``."""
        chats = self.modules["open_webui.models.chats"]
        with self.db.get_db() as session:
            row = session.get(chats.Chat, id)
            return chats.ChatModel.model_validate(row) if row is not None else None

    def get_file(self, id: str) -> Any:
        files = self.modules["open_webui.models.files"]
        with self.db.get_db() as session:
            row = session.get(files.File, id)
            return files.FileModel.model_validate(row) if row is not None else None

    def set_config(self, key: str, value: Any) -> None:
        """async flavour: store a ``config`` row (what ``Config.get(key)`` returns)."""
        if self.flavour != "async":
            raise RuntimeError("0.6.28 has no models.config; use make_request(config=...)")
        config_mod = self.modules["open_webui.models.config"]
        with self.db.get_db() as session:
            row = session.get(config_mod.Config, key)
            if row is None:
                session.add(config_mod.Config(key=key, value=value, updated_at=int(time.time())))
            else:
                row.value = value
            session.commit()

    def make_request(self, *, config: Mapping[str, Any] | None = None, **state: Any) -> Any:
        """A minimal stand-in for the ``fastapi.Request`` passed as ``__request__``.

        * ``request.app.state.config``: only in the sync flavour (0.6.28 keeps live
          settings there, e.g. ``ALLOWED_FILE_EXTENSIONS=[]``, ``FILE_MAX_SIZE=None``);
          absent in the async flavour (0.12.4 has no ``app.state.config``).
        * ``request.app.url_path_for("get_file_content_by_id", id=X)`` ->
          ``/api/v1/files/X/content`` (the route name/path of both versions).
        * ``request.state``, ``request.cookies`` (empty), ``request.headers`` (empty),
          ``request.base_url`` (``http://localhost:8080/``).
        """
        app_state = SimpleNamespace(**state)
        if self.flavour == "sync":
            cfg = {"ALLOWED_FILE_EXTENSIONS": [], "FILE_MAX_SIZE": None,
                   "USER_PERMISSIONS": copy.deepcopy(
                       self.modules["open_webui.config"].USER_PERMISSIONS.value)}
            cfg.update(config or {})
            app_state.config = SimpleNamespace(**cfg)
        elif config:
            raise ValueError("the async flavour (0.12.4) has no request.app.state.config")

        routes = {
            "get_file_content_by_id": "/api/v1/files/{id}/content",
            "get_file_by_id": "/api/v1/files/{id}",
        }

        def url_path_for(name: str, **params: Any) -> str:
            return routes[name].format(**params)

        app = SimpleNamespace(state=app_state, url_path_for=url_path_for)
        return SimpleNamespace(app=app, state=SimpleNamespace(), cookies={}, headers={},
                               base_url="http://localhost:8080/", url_path_for=url_path_for)

    def uninstall(self) -> None:
        uninstall()


# --------------------------------------------------------------------------- install


def install(flavour: str = "async", *, data_dir: Path | str, database_url: str | None = None,
            secret_key: str = "owui-stubs-test-secret", src_log_levels: str = "empty",
            env: Mapping[str, str] | None = None) -> StubHandle:
    """Register the fake ``open_webui`` of ``flavour`` ("sync" = 0.6.28, "async" = 0.12.4).

    ``data_dir`` holds ``webui.db`` (unless ``database_url`` is given) and ``uploads/``.
    ``env`` sets further real Open WebUI environment variables (e.g. ``OFFLINE_MODE``)
    before the stub ``env`` module is imported.  ``src_log_levels="filled"`` reproduces
    the populated 0.6.28 ``SRC_LOG_LEVELS`` (sync flavour only).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    if _STATE["handle"] is not None:
        raise RuntimeError("owui_stubs already installed; call uninstall() first")
    foreign = sorted(n for n in sys.modules if _is_stub_name(n))
    if foreign:
        raise RuntimeError(f"a real or foreign open_webui is already imported: {foreign[:3]}")

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{data_dir}/webui.db"
    wanted = {"DATA_DIR": str(data_dir), "DATABASE_URL": database_url,
              "WEBUI_SECRET_KEY": secret_key, **(env or {})}
    env_backup = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)

    finder = _StubFinder([_FLAVOUR_ROOT / flavour, _FLAVOUR_ROOT / "common"])
    sys.meta_path.insert(0, finder)
    importlib.invalidate_caches()
    modules: dict[str, ModuleType] = {}
    try:
        for name in STUB_MODULES[flavour]:
            modules[name] = importlib.import_module(name)
        modules["open_webui"].__stub_flavour__ = flavour
        if src_log_levels == "filled":
            if flavour != "sync":
                raise ValueError("SRC_LOG_LEVELS is always {} from 0.8 on")
            env_mod = modules["open_webui.env"]
            env_mod.SRC_LOG_LEVELS.update(
                {src: os.environ.get(f"{src}_LOG_LEVEL", "").upper() or env_mod.GLOBAL_LOG_LEVEL
                 for src in env_mod.log_sources}
            )
        db = modules["open_webui.internal.db"]
        db.Base.metadata.create_all(db.engine)
    except BaseException:
        _teardown(finder, env_backup, [])
        raise

    handle = StubHandle(flavour, data_dir, database_url, modules, env_backup, finder)
    _STATE["handle"] = handle
    return handle


def current() -> StubHandle | None:
    """The active handle, if any."""
    return _STATE["handle"]


def installed_flavour() -> str | None:
    handle = _STATE["handle"]
    return handle.flavour if handle is not None else None


def _teardown(finder: _StubFinder, env_backup: Mapping[str, str | None], engines: list) -> None:
    for engine in engines:
        try:
            engine.dispose()
        except Exception:  # pragma: no cover - best effort
            pass
    for name in [n for n in sys.modules if _is_stub_name(n)]:
        del sys.modules[name]
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    for key, value in env_backup.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def uninstall() -> None:
    """Remove every ``open_webui*`` module, loaded function modules, the finder and the
    environment variables install() set.  Safe to call when nothing is installed."""
    from ._loader import forget_loaded_modules

    handle: StubHandle | None = _STATE["handle"]
    forget_loaded_modules()
    if handle is None:
        return
    _STATE["handle"] = None
    handle.installed = False
    db = handle.modules.get("open_webui.internal.db")
    engines = [db.engine] if db is not None else []
    if db is not None and getattr(db, "STUB_ASYNC_DRIVER", None) == "aiosqlite":
        engines.append(db.async_engine.sync_engine)
    _teardown(handle._finder, handle._env_backup, engines)
