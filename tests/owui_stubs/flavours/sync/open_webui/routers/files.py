"""Stub of ``open_webui.routers.files`` for the "sync" flavour (0.6.28).

``upload_file_handler`` mirrors W06 routers/files.py:160-259 (synchronous; signature
``(request, file=File(...), metadata=Form(None), process=Query(True),
process_in_background=Query(True), user=Depends(get_verified_user),
background_tasks=None)``).  Behaviour reproduced:

* A ``str`` ``metadata`` is JSON-decoded (400 "[ERROR: Invalid metadata format]").
  ``file_metadata = metadata if metadata else {}`` -- the FastAPI ``Form(None)`` default
  is a truthy object, so callers must pass ``metadata`` explicitly.
* With ``process`` truthy it reads ``request.app.state.config.ALLOWED_FILE_EXTENSIONS``
  (so ``request`` must carry that, see ``StubHandle.make_request``) and rejects other
  extensions.
* Stored name ``"<uuid>_<basename>"`` through ``Storage.upload_file`` with the four
  ``OpenWebUI-*`` tags (reads ``user.email``, ``user.id``, ``user.name``).
* ``FileForm`` data ``{"status": "pending"}`` only when processing; meta ``{name,
  content_type, size, data: file_metadata}``.
* ``process`` truthy -> ``{"status": True, **file_item.model_dump()}``; otherwise the
  ``FileModel`` itself.
* **Every** exception, including the HTTPException for a disallowed extension, becomes
  ``HTTPException(400, "[ERROR: Error uploading file]")`` (the 0.6.28 ``except Exception``).

RAG processing is not reproduced: ``process_uploaded_file`` only records its call in
``STUB_PROCESSED_UPLOADS``.
"""

import json
import logging
import os
import uuid
from typing import Optional

from open_webui.constants import ERROR_MESSAGES
from open_webui.models.files import FileForm, Files
from open_webui.storage.provider import Storage
from open_webui.utils._stub_fastapi import (
    HTTP_400_BAD_REQUEST,
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

log = logging.getLogger(__name__)

STUB_PROCESSED_UPLOADS: list = []


def process_uploaded_file(request, file, file_path, file_item, file_metadata, user):
    """Stand-in for the real RAG processing (W06 routers/files.py:88): records the call."""
    STUB_PROCESSED_UPLOADS.append(
        {
            "file_id": getattr(file_item, "id", None),
            "file_path": file_path,
            "metadata": file_metadata,
        }
    )


def upload_file_handler(
    request: Request,
    file: UploadFile = File(...),  # noqa: B008 - real signature
    metadata: Optional[dict | str] = Form(None),  # noqa: B008, UP045
    process: bool = Query(True),
    process_in_background: bool = Query(True),
    user=Depends(get_verified_user),  # noqa: B008
    background_tasks: Optional[BackgroundTasks] = None,  # noqa: UP045
):
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise HTTPException(
                status_code=HTTP_400_BAD_REQUEST,
                detail=ERROR_MESSAGES.DEFAULT("Invalid metadata format"),
            ) from exc
    file_metadata = metadata if metadata else {}

    try:
        name = os.path.basename(file.filename)
        extension = os.path.splitext(name)[1]
        extension = extension[1:] if extension else ""

        if process and request.app.state.config.ALLOWED_FILE_EXTENSIONS:
            allowed = [ext for ext in request.app.state.config.ALLOWED_FILE_EXTENSIONS if ext]
            request.app.state.config.ALLOWED_FILE_EXTENSIONS = allowed
            if extension not in allowed:
                raise HTTPException(
                    status_code=HTTP_400_BAD_REQUEST,
                    detail=ERROR_MESSAGES.DEFAULT(f"File type {extension} is not allowed"),
                )

        file_id = str(uuid.uuid4())
        contents, file_path = Storage.upload_file(
            file.file,
            f"{file_id}_{name}",
            {
                "OpenWebUI-User-Email": user.email,
                "OpenWebUI-User-Id": user.id,
                "OpenWebUI-User-Name": user.name,
                "OpenWebUI-File-Id": file_id,
            },
        )
        file_item = Files.insert_new_file(
            user.id,
            FileForm(
                id=file_id,
                filename=name,
                path=file_path,
                data={"status": "pending"} if process else {},
                meta={
                    "name": name,
                    "content_type": file.content_type,
                    "size": len(contents),
                    "data": file_metadata,
                },
            ),
        )

        if process:
            if background_tasks and process_in_background:
                background_tasks.add_task(
                    process_uploaded_file, request, file, file_path, file_item, file_metadata, user
                )
            else:
                process_uploaded_file(request, file, file_path, file_item, file_metadata, user)
            return {"status": True, **file_item.model_dump()}
        if file_item:
            return file_item
        raise HTTPException(
            status_code=HTTP_400_BAD_REQUEST,
            detail=ERROR_MESSAGES.DEFAULT("Error uploading file"),
        )
    except Exception as e:
        log.exception(e)
        raise HTTPException(
            status_code=HTTP_400_BAD_REQUEST,
            detail=ERROR_MESSAGES.DEFAULT("Error uploading file"),
        ) from e
