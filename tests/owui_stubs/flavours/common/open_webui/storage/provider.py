"""Stub of ``open_webui.storage.provider`` -- local backend only.

The local provider is synchronous in every version; 0.12 routers merely wrap it in
``asyncio.to_thread``.  Facts mirrored:

* ``StorageProvider`` abstract API and ``LocalStorageProvider`` static methods
  (W06 storage/provider.py:43-100; OW storage/provider.py:45-103).
* ``upload_file`` reads the whole stream, raises ``ValueError(EMPTY_CONTENT)`` on empty
  content, writes ``UPLOAD_DIR/<filename>`` and returns ``(contents, path)``.
* ``get_file`` returns the path unchanged; ``delete_file`` only looks at the basename
  inside ``UPLOAD_DIR`` and logs (never raises) when missing.
* ``Storage`` is a module-level ``LocalStorageProvider()`` instance (OW :341-360).
"""

import logging
import os
import shutil
from abc import ABC, abstractmethod
from typing import BinaryIO, Dict, Tuple  # noqa: UP035 - mirrors the real annotations

from open_webui.config import STORAGE_PROVIDER, UPLOAD_DIR
from open_webui.constants import ERROR_MESSAGES

log = logging.getLogger(__name__)


class StorageProvider(ABC):
    @abstractmethod
    def get_file(self, file_path: str) -> str:
        pass

    @abstractmethod
    def upload_file(self, file: BinaryIO, filename: str, tags: Dict[str, str]) -> Tuple[bytes, str]:  # noqa: UP006
        pass

    @abstractmethod
    def delete_all_files(self) -> None:
        pass

    @abstractmethod
    def delete_file(self, file_path: str) -> None:
        pass


class LocalStorageProvider(StorageProvider):
    @staticmethod
    def upload_file(file: BinaryIO, filename: str, tags: Dict[str, str]) -> Tuple[bytes, str]:  # noqa: UP006
        data = file.read()
        if not data:
            raise ValueError(ERROR_MESSAGES.EMPTY_CONTENT)
        target = os.path.join(UPLOAD_DIR, filename)
        with open(target, "wb") as out:
            out.write(data)
        return data, target

    @staticmethod
    def get_file(file_path: str) -> str:
        return file_path

    @staticmethod
    def delete_file(file_path: str) -> None:
        target = os.path.join(UPLOAD_DIR, os.path.basename(file_path))
        if os.path.isfile(target):
            os.remove(target)
        else:
            log.warning("File %s not found in local storage.", target)

    @staticmethod
    def delete_all_files() -> None:
        if not os.path.exists(UPLOAD_DIR):
            log.warning("Directory %s not found in local storage.", UPLOAD_DIR)
            return
        for name in os.listdir(UPLOAD_DIR):
            entry = os.path.join(UPLOAD_DIR, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)


def get_storage_provider(storage_provider: str):
    if storage_provider != "local":
        raise RuntimeError(
            f"owui_stubs only implements the local storage provider, not {storage_provider!r}"
        )
    return LocalStorageProvider()


Storage = get_storage_provider(STORAGE_PROVIDER)
