"""Stub of the ``open_webui.utils.access_control`` package (0.12.4): only its ``files``
submodule is stubbed (the package's own permission helpers are not used by the pipe)."""
