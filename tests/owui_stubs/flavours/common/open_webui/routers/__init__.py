"""Stub sub-package of open_webui (empty, like the real one)."""
