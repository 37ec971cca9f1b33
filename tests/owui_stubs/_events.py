"""EventRecorder: an ``__event_emitter__`` / ``__event_call__`` test double.

Open WebUI's emitter is ``async def __event_emitter__(event: dict)`` and serialises the
event at once (socket.io emit), so later mutation of the dict by the pipe is not seen;
the recorder therefore stores a deep copy.  ``__event_call__`` has the same shape but
returns the browser's answer; give ``replies`` to script it (0.12 returns
``{"error": "..."}`` instead of raising when the client is gone -- script that too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any


class EventRecorder:
    def __init__(self, replies: Mapping[str, Any] | Callable[[dict], Any] | None = None):
        self.events: list[dict] = []
        self._replies = replies

    async def __call__(self, event: dict) -> Any:
        try:
            stored = copy.deepcopy(event)
        except Exception:
            stored = event
        self.events.append(stored)
        if self._replies is None:
            return None
        if callable(self._replies):
            result = self._replies(event)
            if hasattr(result, "__await__"):
                result = await result
            return result
        return self._replies.get(event.get("type"))

    # -- queries -----------------------------------------------------------------------
    @property
    def types(self) -> list[str]:
        return [e.get("type") for e in self.events]

    def of_type(self, event_type: str) -> list[dict]:
        """Full events (``{"type", "data"}``) of one type, in emission order."""
        return [e for e in self.events if e.get("type") == event_type]

    def data_of(self, event_type: str) -> list[Any]:
        """Just the ``data`` payloads of one type."""
        return [e.get("data") for e in self.of_type(event_type)]

    @property
    def statuses(self) -> list[dict]:
        """``data`` of every ``status`` event (``{"description", "done", ...}``)."""
        return self.data_of("status")

    def clear(self) -> None:
        self.events.clear()

    # No __len__ on purpose: pipes guard with ``if __event_emitter__:`` and an empty
    # recorder must stay truthy, like the real emitter function.
