"""Stub of ``open_webui.utils.access_control.files`` for the "async" flavour (0.12.4).

``has_access_to_file`` mirrors OW utils/access_control/files.py:49 -- ``async def
has_access_to_file(file_id, access_type, user, db=None, user_group_ids=None)``: the file is
looked up with ``Files.get_file_by_id`` (missing -> False) and its owner has access. The other
grants the real helper checks (knowledge bases, channels, shared chats, notes, workspace
models) have no tables in the stubs, so they never grant access here.
"""

from open_webui.models.files import Files


async def has_access_to_file(
    file_id: str | None,
    access_type: str,
    user,
    db=None,
    user_group_ids: set[str] | None = None,
) -> bool:
    file = await Files.get_file_by_id(file_id, db=db)
    if not file:
        return False
    return file.user_id == user.id
