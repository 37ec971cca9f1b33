"""Stub of ``open_webui.utils.access_control`` for the "sync" flavour (0.6.28): only
``has_permission`` (W06 utils/access_control.py:71) -- ``def has_permission(user_id,
permission_key, default_permissions={}) -> bool``, synchronous: the dotted key in each of the
user's groups' permissions, then in ``default_permissions`` filled from
``DEFAULT_USER_PERMISSIONS`` (in place, as the real one does); a missing level denies. The
stub's groups carry no permissions, so only the defaults decide: 0.6.28 callers pass
``request.app.state.config.USER_PERMISSIONS`` (see ``StubHandle.make_request``).
"""

from typing import Any, Dict, Optional, Set  # noqa: UP035 -- as the real module

from open_webui.config import DEFAULT_USER_PERMISSIONS


def fill_missing_permissions(
    permissions: Dict[str, Any], default_permissions: Dict[str, Any]  # noqa: UP006
) -> Dict[str, Any]:  # noqa: UP006
    for key, value in default_permissions.items():
        if key not in permissions:
            permissions[key] = value
        elif isinstance(value, dict) and isinstance(permissions[key], dict):
            permissions[key] = fill_missing_permissions(permissions[key], value)
    return permissions


def _STUB_get(permissions: Any, keys: list) -> bool:
    for key in keys:
        if not isinstance(permissions, dict) or key not in permissions:
            return False
        permissions = permissions[key]
    return bool(permissions)


def has_permission(
    user_id: str,
    permission_key: str,
    default_permissions: Dict[str, Any] = {},  # noqa: B006, UP006 -- the real signature
) -> bool:
    defaults = fill_missing_permissions(default_permissions, DEFAULT_USER_PERMISSIONS)
    return _STUB_get(defaults, permission_key.split("."))


def has_access(
    user_id: str,
    type: str = "write",
    access_control: Optional[dict] = None,  # noqa: UP045
    user_group_ids: Optional[Set[str]] = None,  # noqa: UP006, UP045
) -> bool:
    """W06 utils/access_control.py:108: None = everyone may read; else the user's id or one of
    their groups in `access_control[type]`."""
    if access_control is None:
        return type == "read"
    if user_group_ids is None:
        from open_webui.models.groups import Groups

        user_group_ids = {g.id for g in Groups.get_groups_by_member_id(user_id)}
    allowed = access_control.get(type, {})
    return user_id in allowed.get("user_ids", []) or bool(
        set(allowed.get("group_ids", [])) & set(user_group_ids))
