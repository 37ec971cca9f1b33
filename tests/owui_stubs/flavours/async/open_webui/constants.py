"""Stub of ``open_webui.constants`` for the "async" flavour (0.12.4).

* ``ERROR_MESSAGES.DEFAULT(err="", fallback="")`` (OW constants.py:16-23, 41):
  ``"Something went wrong :/"`` for a falsy ``err``; ``"[ERROR: <errno text>]"`` for
  known ``OSError`` errnos; for any other exception ``"[ERROR: <fallback>]"`` or the
  generic text; otherwise ``"[ERROR: <err>]"``.
* ``TASKS`` values (OW constants.py:136-149).
"""

import errno
from enum import Enum

_ERRNO_TEXT = {
    errno.ENAMETOOLONG: "File name is too long.",
    errno.ENOSPC: "The server is out of storage space.",
    errno.EDQUOT: "Server storage quota exceeded.",
    errno.EACCES: "Server storage is not writable.",
    errno.EPERM: "Server storage is not writable.",
    errno.EROFS: "Server storage is not writable.",
}


def _error_message(err="", fallback="") -> str:
    if not err:
        return "Something went wrong :/"
    if isinstance(err, OSError) and err.errno in _ERRNO_TEXT:
        return f"[ERROR: {_ERRNO_TEXT[err.errno]}]"
    if isinstance(err, Exception):
        return f"[ERROR: {fallback}]" if fallback else "Something went wrong :/"
    return f"[ERROR: {err}]"


def _too_large(size=""):
    return (
        "Oops! The file you're trying to upload is too large. "
        f"Please upload a file that is less than {size}."
    )


class ERROR_MESSAGES(str, Enum):  # noqa: UP042 - real base classes
    def __str__(self) -> str:
        return super().__str__()

    DEFAULT = _error_message
    FILE_TOO_LARGE = _too_large
    EMPTY_CONTENT = (
        "The content provided is empty. Please ensure that there is text or data present "
        "before proceeding."
    )
    NOT_FOUND = "We could not find what you're looking for :/"
    ACCESS_PROHIBITED = (
        "You do not have permission to access this resource. Please contact your "
        "administrator for assistance."
    )


def _default_task(task=""):
    return task if task else "generation"


class TASKS(str, Enum):  # noqa: UP042 - real base classes
    def __str__(self) -> str:
        return super().__str__()

    DEFAULT = _default_task
    TITLE_GENERATION = "title_generation"
    FOLLOW_UP_GENERATION = "follow_up_generation"
    TAGS_GENERATION = "tags_generation"
    EMOJI_GENERATION = "emoji_generation"
    QUERY_GENERATION = "query_generation"
    IMAGE_PROMPT_GENERATION = "image_prompt_generation"
    AUTOCOMPLETE_GENERATION = "autocomplete_generation"
    FUNCTION_CALLING = "function_calling"
    MOA_RESPONSE_GENERATION = "moa_response_generation"
