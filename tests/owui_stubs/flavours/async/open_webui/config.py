"""Stub of ``open_webui.config`` for the "async" flavour (0.12.4).

* ``STORAGE_PROVIDER`` (OW config.py:156), ``UPLOAD_DIR``/``CACHE_DIR`` created at import
  (OW config.py:180-189).
* ``RAG_FILE_MAX_SIZE`` is a plain ``int | None`` env default (OW config.py:990) -- no
  ``PersistentConfig``/``.value`` any more.  The live value is
  ``await open_webui.models.config.Config.get("rag.file.max_size")``.
* Like the real module, importing it runs ``Config.configure(defaults=DEFAULT_CONFIG)``
  (OW config.py:3005-3008, 3355-3359), so unset keys fall back to these env defaults.
"""

import os

from open_webui.env import DATA_DIR
from open_webui.models.config import Config

STORAGE_PROVIDER = os.getenv("STORAGE_PROVIDER", "local")

UPLOAD_DIR = DATA_DIR / "uploads"
UPLOAD_DIR.mkdir(parents=True, exist_ok=True)

CACHE_DIR = DATA_DIR / "cache"
CACHE_DIR.mkdir(parents=True, exist_ok=True)

RAG_FILE_MAX_SIZE = int(os.getenv("RAG_FILE_MAX_SIZE")) if os.getenv("RAG_FILE_MAX_SIZE") else None
RAG_ALLOWED_FILE_EXTENSIONS = [  # OW config.py:1005-1007
    ext.strip() for ext in os.getenv("RAG_ALLOWED_FILE_EXTENSIONS", "").split(",") if ext.strip()
]

# OW config.py:1946-1950 and DEFAULT_USER_PERMISSIONS (only the "features" the pipe asks about)
USER_PERMISSIONS_FEATURES_WEB_SEARCH = (
    os.getenv("USER_PERMISSIONS_FEATURES_WEB_SEARCH", "True").lower() == "true")
USER_PERMISSIONS_FEATURES_IMAGE_GENERATION = (
    os.getenv("USER_PERMISSIONS_FEATURES_IMAGE_GENERATION", "True").lower() == "true")
DEFAULT_USER_PERMISSIONS = {
    "features": {
        "web_search": USER_PERMISSIONS_FEATURES_WEB_SEARCH,
        "image_generation": USER_PERMISSIONS_FEATURES_IMAGE_GENERATION,
    },
}
USER_PERMISSIONS = DEFAULT_USER_PERMISSIONS

DEFAULT_CONFIG = {
    "user.permissions": USER_PERMISSIONS,  # OW config.py:3212
    "rag.file.max_size": RAG_FILE_MAX_SIZE,
    "rag.file.allowed_extensions": RAG_ALLOWED_FILE_EXTENSIONS,
}

Config.configure(defaults=DEFAULT_CONFIG)
