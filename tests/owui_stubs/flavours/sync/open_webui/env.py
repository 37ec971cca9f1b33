"""Stub of ``open_webui.env`` for the "sync" flavour (surface of 0.6.28).

Every value is read from the same environment variable, with the same default and
parsing, as W06 env.py (line numbers below).  ``owui_stubs.install()`` sets
``DATA_DIR``, ``DATABASE_URL`` and ``WEBUI_SECRET_KEY`` before importing this module.

``SRC_LOG_LEVELS``: 0.6.28 fills it with one entry per log source (W06 env.py:85-110),
0.8.12 made it an empty dict (W08 env.py:126).  The stub defaults to ``{}`` (the
0.8.12+ reality, so code that indexes it fails loudly); ``install(...,
src_log_levels="filled")`` reproduces the 0.6.28 dict.
"""

import logging
import os
from pathlib import Path

VERSION = "0.6.28"  # W06 env.py:137 (from package.json)
WEBUI_NAME = os.environ.get("WEBUI_NAME", "Open WebUI")  # W06 env.py:113
if WEBUI_NAME != "Open WebUI":
    WEBUI_NAME += " (Open WebUI)"

GLOBAL_LOG_LEVEL = os.environ.get("GLOBAL_LOG_LEVEL", "").upper()  # W06 env.py:73-77
if GLOBAL_LOG_LEVEL not in logging.getLevelNamesMapping():
    GLOBAL_LOG_LEVEL = "INFO"

log_sources = ["AUDIO", "COMFYUI", "CONFIG", "DB", "IMAGES", "MAIN", "MODELS", "OLLAMA",
               "OPENAI", "RAG", "WEBHOOK", "SOCKET", "OAUTH"]  # W06 env.py:85-100 (log_sources)
SRC_LOG_LEVELS: dict = {}  # see module docstring

DATA_DIR = Path(os.getenv("DATA_DIR", Path.cwd() / "data")).resolve()  # W06 env.py:225
DATABASE_URL = os.environ.get("DATABASE_URL", f"sqlite:///{DATA_DIR}/webui.db")  # W06 env.py:272
DATABASE_SCHEMA = os.environ.get("DATABASE_SCHEMA", None)

REDIS_URL = os.environ.get("REDIS_URL", "")  # W06 env.py:371

UVICORN_WORKERS = os.environ.get("UVICORN_WORKERS", "1")  # W06 env.py:393-400
try:
    UVICORN_WORKERS = int(UVICORN_WORKERS)
    if UVICORN_WORKERS < 1:
        UVICORN_WORKERS = 1
except ValueError:
    UVICORN_WORKERS = 1

WEBUI_SECRET_KEY = os.environ.get(  # W06 env.py:436-441
    "WEBUI_SECRET_KEY", os.environ.get("WEBUI_JWT_SECRET_KEY", "t0p-s3cr3t")
)

ENABLE_WEBSOCKET_SUPPORT = (  # W06 env.py:566
    os.environ.get("ENABLE_WEBSOCKET_SUPPORT", "True").lower() == "true"
)
WEBSOCKET_MANAGER = os.environ.get("WEBSOCKET_MANAGER", "")  # W06 env.py:571
WEBSOCKET_REDIS_URL = os.environ.get("WEBSOCKET_REDIS_URL", REDIS_URL)  # W06 env.py:573

AIOHTTP_CLIENT_TIMEOUT = os.environ.get("AIOHTTP_CLIENT_TIMEOUT", "")  # W06 env.py:589-597
if AIOHTTP_CLIENT_TIMEOUT == "":
    AIOHTTP_CLIENT_TIMEOUT = None
else:
    try:
        AIOHTTP_CLIENT_TIMEOUT = int(AIOHTTP_CLIENT_TIMEOUT)
    except ValueError:
        AIOHTTP_CLIENT_TIMEOUT = 300

OFFLINE_MODE = os.environ.get("OFFLINE_MODE", "false").lower() == "true"  # W06 env.py:689
if OFFLINE_MODE:
    os.environ["HF_HUB_OFFLINE"] = "1"
