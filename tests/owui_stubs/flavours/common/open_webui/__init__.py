"""Test stub of the ``open_webui`` package (see tests/owui_stubs/__init__.py).

Installed into ``sys.modules`` by ``owui_stubs.install()``; never imported directly.
The real package's ``__init__`` only defines the ``open-webui`` CLI, so nothing
from it is mirrored here.
"""
