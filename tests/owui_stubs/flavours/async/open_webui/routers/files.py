"""Stub of ``open_webui.routers.files`` for the "async" flavour (0.12.4).

``upload_file_handler`` mirrors OW routers/files.py:320-474 -- a coroutine with signature
``(request, file=File(...), metadata=Form(None), process=Query(True),
process_in_background=Query(True), user=Depends(get_verified_user),
background_tasks=None, db=None)``.  Behaviour reproduced:

* ``str`` metadata is JSON-decoded (400 on bad JSON); ``file_metadata = metadata if
  metadata else {}`` -- FastAPI's ``Form(None)`` default is truthy, pass ``metadata``.
* The extension (lower-cased) is checked against ``await
  Config.get("rag.file.allowed_extensions")`` when ``process`` is truthy (the request
  object is not consulted -- ``request.app.state.config`` no longer exists).
* Stored name ``"<uuid>_<basename>"`` via ``asyncio.to_thread(Storage.upload_file, ...)``
  with the four ``OpenWebUI-*`` tags; on ``ENAMETOOLONG`` it retries as ``"<uuid>.<ext>"``;
  other ``OSError`` -> 400 with the errno text.
* ``await Config.get("rag.file.max_size")`` (MB): larger uploads are deleted again and
  raise 413 ``FILE_TOO_LARGE``.
* ``meta`` = ``{name, content_type (only if str), size, file_hash (sha256 unless
  metadata["file_hash"] is given), data: file_metadata}``; ``data`` =
  ``{"status": "pending"}`` only when processing.
* ``process`` truthy -> ``{"status": True, **file_item.model_dump()}``; otherwise the
  ``FileModel`` itself (``user`` must be a ``UserModel``-like object).
* HTTPExceptions propagate unchanged; any other error -> 400 ``"[ERROR: Error uploading
  file]"``, or ``EMPTY_CONTENT`` for the storage layer's empty-file ``ValueError``.

Not reproduced: channel linking (``metadata["channel_id"]``) and RAG processing --
``process_uploaded_file`` only records its call in ``STUB_PROCESSED_UPLOADS``.
"""

import asyncio
import errno
import hashlib
import json
import logging
import os
import uuid
from typing import Optional

from open_webui.constants import ERROR_MESSAGES
from open_webui.models.config import Config
from open_webui.models.files import FileForm, Files
from open_webui.storage.provider import Storage
from open_webui.utils._stub_fastapi import (
    HTTP_400_BAD_REQUEST,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    BackgroundTasks,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
    get_verified_user,
)
from open_webui.utils.json_codec import JSONCodec

log = logging.getLogger(__name__)

STUB_PROCESSED_UPLOADS: list = []


async def process_uploaded_file(request, file, file_path, file_item, file_metadata, user, db=None):
    """Stand-in for the real RAG processing (OW routers/files.py:128): records the call."""
    STUB_PROCESSED_UPLOADS.append(
        {
            "file_id": getattr(file_item, "id", None),
            "file_path": file_path,
            "metadata": file_metadata,
        }
    )


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=HTTP_400_BAD_REQUEST, detail=ERROR_MESSAGES.DEFAULT(message))


async def upload_file_handler(
    request: Request,
    file: UploadFile = File(...),  # noqa: B008 - real signature
    metadata: Optional[dict | str] = Form(None),  # noqa: B008, UP045
    process: bool = Query(True),
    process_in_background: bool = Query(True),
    user=Depends(get_verified_user),  # noqa: B008
    background_tasks: Optional[BackgroundTasks] = None,  # noqa: UP045
    db=None,
):
    if isinstance(metadata, str):
        try:
            metadata = JSONCodec.loads(metadata)
        except json.JSONDecodeError as exc:
            raise _bad_request("Invalid metadata format") from exc
    file_metadata = metadata if metadata else {}

    try:
        name = os.path.basename(file.filename)
        extension = os.path.splitext(name)[1]
        extension = extension[1:].lower() if extension else ""

        allowed = await Config.get("rag.file.allowed_extensions")
        if process and allowed:
            allowed = [ext for ext in allowed if ext]
            if extension not in allowed:
                raise _bad_request(f"File type {extension} is not allowed")

        file_id = str(uuid.uuid4())
        tags = {
            "OpenWebUI-User-Email": user.email,
            "OpenWebUI-User-Id": user.id,
            "OpenWebUI-User-Name": user.name,
            "OpenWebUI-File-Id": file_id,
        }
        try:
            contents, file_path = await asyncio.to_thread(
                Storage.upload_file, file.file, f"{file_id}_{name}", tags
            )
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise _bad_request(exc.strerror or "Error uploading file") from exc
            file.file.seek(0)
            short_name = f"{file_id}.{extension}" if extension else file_id
            try:
                contents, file_path = await asyncio.to_thread(
                    Storage.upload_file, file.file, short_name, tags
                )
            except OSError as exc2:
                raise _bad_request(exc2.strerror or "Error uploading file") from exc2

        max_size = await Config.get("rag.file.max_size")
        if max_size and len(contents) > int(max_size) * 1024 * 1024:
            await asyncio.to_thread(Storage.delete_file, file_path)
            raise HTTPException(
                status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                detail=ERROR_MESSAGES.FILE_TOO_LARGE(size=f"{max_size} MB"),
            )

        file_hash = file_metadata.get("file_hash") or hashlib.sha256(contents).hexdigest()
        file_item = await Files.insert_new_file(
            user.id,
            FileForm(
                id=file_id,
                filename=name,
                path=file_path,
                data={"status": "pending"} if process else {},
                meta={
                    "name": name,
                    "content_type": (
                        file.content_type if isinstance(file.content_type, str) else None
                    ),
                    "size": len(contents),
                    "file_hash": file_hash,
                    "data": file_metadata,
                },
            ),
            db=db,
        )

        if process:
            if background_tasks and process_in_background:
                background_tasks.add_task(
                    process_uploaded_file, request, file, file_path, file_item, file_metadata, user
                )
            else:
                await process_uploaded_file(
                    request, file, file_path, file_item, file_metadata, user, db=db
                )
            return {"status": True, **file_item.model_dump()}
        if file_item:
            return file_item
        raise _bad_request("Error uploading file")
    except HTTPException:
        raise
    except Exception as e:
        log.exception(e)
        empty = isinstance(e, ValueError) and e.args == (ERROR_MESSAGES.EMPTY_CONTENT,)
        raise HTTPException(
            status_code=HTTP_400_BAD_REQUEST,
            detail=(
                ERROR_MESSAGES.EMPTY_CONTENT
                if empty
                else ERROR_MESSAGES.DEFAULT("Error uploading file")
            ),
        ) from e
