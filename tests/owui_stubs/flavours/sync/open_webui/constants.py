"""Stub of ``open_webui.constants`` for the "sync" flavour (0.6.28).

Only the members a pipe or the stubbed routers use.  Like the real ``str`` Enums,
the lambda-valued entries are plain functions, not enum members.

* ``ERROR_MESSAGES.DEFAULT(err)`` -> ``"Something went wrong :/"`` for ``""`` else
  ``"[ERROR: <err>]"`` (W06 constants.py:24-26).
* ``TASKS`` values (W06 constants.py:108-121).
"""

from enum import Enum


def _default_error(err=""):
    return "Something went wrong :/" if err == "" else f"[ERROR: {err}]"


def _too_large(size=""):
    return (
        "Oops! The file you're trying to upload is too large. "
        f"Please upload a file that is less than {size}."
    )


class ERROR_MESSAGES(str, Enum):  # noqa: UP042 - real base classes
    def __str__(self) -> str:
        return super().__str__()

    DEFAULT = _default_error
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
