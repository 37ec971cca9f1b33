"""Stub of the ``open_webui.utils.access_control`` package (0.12.4): its ``files`` submodule
and ``has_permission``.

``has_permission`` mirrors OW utils/access_control/__init__.py:70 -- ``async def
has_permission(user_id, permission_key, default_permissions={}, db=None) -> bool``: a
dotted key is looked up in each of the user's groups' permissions, then in
``default_permissions`` filled from ``DEFAULT_USER_PERMISSIONS``; a missing level denies.
The stub's groups carry no permissions (no such column here), so only the defaults decide:
tests set them with ``StubHandle.set_config("user.permissions", {...})``, which is what
Open WebUI's middleware passes (``await Config.get('user.permissions')``).
"""

from copy import deepcopy
from typing import Any

from open_webui.config import DEFAULT_USER_PERMISSIONS


def fill_missing_permissions(permissions: dict[str, Any], default_permissions: dict[str, Any]
                             ) -> dict[str, Any]:
    for key, value in default_permissions.items():
        if key not in permissions:
            permissions[key] = deepcopy(value)
        elif isinstance(value, dict) and isinstance(permissions[key], dict):
            permissions[key] = fill_missing_permissions(permissions[key], value)
    return permissions


def _STUB_get(permissions: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(permissions, dict) or key not in permissions:
            return False
        permissions = permissions[key]
    return bool(permissions)


async def has_permission(
    user_id: str,
    permission_key: str,
    default_permissions: dict[str, Any] = {},  # noqa: B006 -- the real signature
    db=None,
) -> bool:
    defaults = fill_missing_permissions(deepcopy(default_permissions or {}),
                                        DEFAULT_USER_PERMISSIONS)
    return _STUB_get(defaults, permission_key.split("."))
