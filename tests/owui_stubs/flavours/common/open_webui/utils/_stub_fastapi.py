"""FastAPI names the stubbed routers need (stub-only helper, not in the real package).

Uses FastAPI itself when it is importable, so the parameter defaults of
``upload_file_handler`` are the very same truthy ``FieldInfo`` objects the real function
has (calling it without passing ``metadata``/``process`` therefore misbehaves exactly
like the real one).  Falls back to tiny look-alikes otherwise.
"""

from typing import Any

try:
    from fastapi import (
        BackgroundTasks,
        Depends,
        File,
        Form,
        HTTPException,
        Query,
        Request,
        UploadFile,
    )

    HAVE_FASTAPI = True
except ImportError:  # pragma: no cover - exercised only without fastapi
    HAVE_FASTAPI = False

    class _Param:
        def __init__(self, kind: str, default: Any = ..., **extra: Any):
            self.kind = kind
            self.default = default
            self.extra = extra

        def __repr__(self) -> str:
            return f"{self.kind}({self.default!r})"

    def File(default: Any = ..., **extra: Any) -> Any:
        return _Param("File", default, **extra)

    def Form(default: Any = ..., **extra: Any) -> Any:
        return _Param("Form", default, **extra)

    def Query(default: Any = ..., **extra: Any) -> Any:
        return _Param("Query", default, **extra)

    def Depends(dependency: Any = None, **extra: Any) -> Any:
        return _Param("Depends", dependency, **extra)

    class HTTPException(Exception):
        def __init__(self, status_code: int, detail: Any = None, headers: Any = None):
            super().__init__(status_code, detail)
            self.status_code = status_code
            self.detail = detail
            self.headers = headers

    class BackgroundTasks:
        def __init__(self) -> None:
            self.tasks: list = []

        def add_task(self, func: Any, *args: Any, **kwargs: Any) -> None:
            self.tasks.append((func, args, kwargs))

    class UploadFile:
        def __init__(self, file: Any, *, filename: Any = None, content_type: Any = None, **_: Any):
            self.file = file
            self.filename = filename
            self.content_type = content_type

    Request = Any

HTTP_400_BAD_REQUEST = 400
HTTP_413_REQUEST_ENTITY_TOO_LARGE = 413


def get_verified_user(*_args: Any, **_kwargs: Any) -> Any:
    """Placeholder for ``open_webui.utils.auth.get_verified_user`` (a FastAPI dependency)."""
    raise RuntimeError("get_verified_user is a FastAPI dependency; pass user= explicitly")


__all__ = [
    "HAVE_FASTAPI",
    "HTTP_400_BAD_REQUEST",
    "HTTP_413_REQUEST_ENTITY_TOO_LARGE",
    "BackgroundTasks",
    "Depends",
    "File",
    "Form",
    "HTTPException",
    "Query",
    "Request",
    "UploadFile",
    "get_verified_user",
]
