"""Stub of ``open_webui.config`` for the "sync" flavour (0.6.28).

* ``UPLOAD_DIR = DATA_DIR / "uploads"`` and ``CACHE_DIR = DATA_DIR / "cache"``, both
  created at import (W06 config.py:855-864).
* ``STORAGE_PROVIDER`` env default ``"local"`` (W06 config.py:828).
* ``RAG_FILE_MAX_SIZE`` is a ``PersistentConfig`` -- read it through ``.value``
  (W06 config.py:2383-2391).  The live value used by the routers is
  ``request.app.state.config.FILE_MAX_SIZE`` (W06 main.py:791); see
  ``StubHandle.make_request``.
"""

import os
from typing import Generic, TypeVar

from open_webui.env import DATA_DIR

T = TypeVar("T")

PERSISTENT_CONFIG_REGISTRY: list = []


class PersistentConfig(Generic[T]):
    """Minimal ``PersistentConfig`` (W06 config.py:165-210): no DB seeding in the stub."""

    def __init__(self, env_name: str, config_path: str, env_value: T):
        self.env_name = env_name
        self.config_path = config_path
        self.env_value = env_value
        self.config_value = None
        self.value = env_value
        PERSISTENT_CONFIG_REGISTRY.append(self)

    def __str__(self):
        return str(self.value)


STORAGE_PROVIDER = os.environ.get("STORAGE_PROVIDER", "local")

UPLOAD_DIR = DATA_DIR / "uploads"
UPLOAD_DIR.mkdir(parents=True, exist_ok=True)

CACHE_DIR = DATA_DIR / "cache"
CACHE_DIR.mkdir(parents=True, exist_ok=True)

RAG_FILE_MAX_SIZE = PersistentConfig(
    "RAG_FILE_MAX_SIZE",
    "rag.file.max_size",
    int(os.environ["RAG_FILE_MAX_SIZE"]) if os.environ.get("RAG_FILE_MAX_SIZE") else None,
)

# W06 config.py:1271-1278, 1290-1338 (only the "features" the pipe asks about). The live
# value is ``request.app.state.config.USER_PERMISSIONS`` (see ``StubHandle.make_request``).
USER_PERMISSIONS_FEATURES_WEB_SEARCH = (
    os.environ.get("USER_PERMISSIONS_FEATURES_WEB_SEARCH", "True").lower() == "true"
)
USER_PERMISSIONS_FEATURES_IMAGE_GENERATION = (
    os.environ.get("USER_PERMISSIONS_FEATURES_IMAGE_GENERATION", "True").lower() == "true"
)
DEFAULT_USER_PERMISSIONS = {
    "features": {
        "web_search": USER_PERMISSIONS_FEATURES_WEB_SEARCH,
        "image_generation": USER_PERMISSIONS_FEATURES_IMAGE_GENERATION,
    },
}
USER_PERMISSIONS = PersistentConfig("USER_PERMISSIONS", "user.permissions",
                                    DEFAULT_USER_PERMISSIONS)
