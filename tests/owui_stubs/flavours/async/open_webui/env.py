"""Stub of ``open_webui.env`` for the "async" flavour (0.12.4).

Same environment variables, defaults and parsing as OW env.py (line numbers below).
``owui_stubs.install()`` sets ``DATA_DIR``, ``DATABASE_URL`` and ``WEBUI_SECRET_KEY``
before importing this module.  Unlike the real module the stub does not
``SystemExit`` on an empty ``WEBUI_SECRET_KEY`` (OW env.py:787-795); install() always
provides one.
"""

import logging
import os
from pathlib import Path

VERSION = "0.12.4"  # OW env.py:151 (package metadata)
WEBUI_NAME = os.getenv("WEBUI_NAME", "Open WebUI")  # OW env.py:969
if WEBUI_NAME != "Open WebUI":
    WEBUI_NAME += " (Open WebUI)"

GLOBAL_LOG_LEVEL = os.getenv("GLOBAL_LOG_LEVEL", "").upper()  # OW env.py:113
if GLOBAL_LOG_LEVEL not in logging.getLevelNamesMapping():
    GLOBAL_LOG_LEVEL = "INFO"
SRC_LOG_LEVELS: dict = {}  # OW env.py:133 "Legacy variable, do not remove" -- always empty

ENABLE_ORJSON = os.getenv("ENABLE_ORJSON", "True").lower() == "true"  # OW env.py:162

DATA_DIR = Path(os.getenv("DATA_DIR", Path.cwd() / "data")).resolve()  # OW env.py:228
DATABASE_URL = os.getenv("DATABASE_URL", f"sqlite:///{DATA_DIR}/webui.db")  # OW env.py:271
DATABASE_SCHEMA = os.getenv("DATABASE_SCHEMA", None)  # OW env.py:303
DATABASE_ENABLE_SESSION_SHARING = (  # OW env.py:366
    os.getenv("DATABASE_ENABLE_SESSION_SHARING", "False").lower() == "true"
)

REDIS_URL = os.getenv("REDIS_URL", "")  # OW env.py:381

try:  # OW env.py:461-464
    UVICORN_WORKERS = max(int(os.getenv("UVICORN_WORKERS", "1")), 1)
except (ValueError, TypeError):
    UVICORN_WORKERS = 1

ENABLE_WEBSOCKET_SUPPORT = os.getenv("ENABLE_WEBSOCKET_SUPPORT", "True").lower() == "true"  # :473
WEBSOCKET_MANAGER = os.getenv("WEBSOCKET_MANAGER", "")  # OW env.py:476
WEBSOCKET_REDIS_URL = os.getenv("WEBSOCKET_REDIS_URL", REDIS_URL)  # OW env.py:493

_aiohttp_timeout_raw = os.getenv("AIOHTTP_CLIENT_TIMEOUT", "")  # OW env.py:614-618
try:
    AIOHTTP_CLIENT_TIMEOUT = int(_aiohttp_timeout_raw) if _aiohttp_timeout_raw else None
except (ValueError, TypeError):
    AIOHTTP_CLIENT_TIMEOUT = 300

WEBUI_SECRET_KEY = os.getenv("WEBUI_SECRET_KEY", os.getenv("WEBUI_JWT_SECRET_KEY", ""))  # :770
ENABLE_VALVE_ENCRYPTION = os.getenv("ENABLE_VALVE_ENCRYPTION", "False").lower() == "true"  # :775

ENABLE_PLUGINS = os.getenv("ENABLE_PLUGINS", "True").lower() == "true"  # OW env.py:1206
ENABLE_FUNCTIONS = ENABLE_PLUGINS and os.getenv("ENABLE_FUNCTIONS", "True").lower() == "true"
ENABLE_PIP_INSTALL_FRONTMATTER_REQUIREMENTS = (  # OW env.py:1212-1214
    os.getenv("ENABLE_PIP_INSTALL_FRONTMATTER_REQUIREMENTS", "True").lower() == "true"
)

OFFLINE_MODE = os.getenv("OFFLINE_MODE", "false").lower() == "true"  # OW env.py:1225
if OFFLINE_MODE:
    os.environ["HF_HUB_OFFLINE"] = "1"
