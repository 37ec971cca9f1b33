"""Call the pipe the way Open WebUI does and collect what a user would see."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openrouter_responses_pipe import Pipe


@dataclass
class Streamed:
    chunks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def deltas(self) -> list[dict[str, Any]]:
        return [c["choices"][0]["delta"] for c in self.chunks if c.get("choices")]

    @property
    def text(self) -> str:
        return "".join(d.get("content") or "" for d in self.deltas)

    @property
    def reasoning(self) -> str:
        return "".join(d.get("reasoning_content") or "" for d in self.deltas)

    @property
    def content_chunks(self) -> int:
        return sum(1 for d in self.deltas if d.get("content"))

    @property
    def usage(self) -> dict[str, Any] | None:
        found = [c["usage"] for c in self.chunks if c.get("choices") == [] and "usage" in c]
        return found[-1] if found else None

    @property
    def error(self) -> str | None:
        found = [c["error"]["message"] for c in self.chunks if "error" in c]
        return found[-1] if found else None


def body(model: str, text: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": f"openrouter.{model}", "stream": stream,
            "messages": [{"role": "user", "content": text}], **extra}


async def stream(pipe: Pipe, payload: dict[str, Any], **kwargs: Any) -> Streamed:
    kwargs.setdefault("__user__", {"id": "user-1", "role": "user", "valves": None})
    result = await pipe.pipe(body=payload, **kwargs)
    out = Streamed()
    async for chunk in result:
        out.chunks.append(chunk)
    return out


def posts(emulator: Any) -> list[dict[str, Any]]:
    """The POST /responses requests the emulator received, oldest first."""
    return [r for r in emulator.requests if r["path"].endswith("/responses")]


def share_catalog(handle: Any) -> None:
    """0.6.28 flavour: a model record every user may read for each catalog model, as the
    pipe's record sync with MODEL_ACCESS=all leaves them; 0.6 has the pipe check them for
    ordinary users on every request (0.12 checks them itself)."""
    if handle.flavour != "sync":
        return
    from openrouter_emulator import load_catalog

    for row in load_catalog():
        handle.share_model(f"openrouter.{row['id']}")
