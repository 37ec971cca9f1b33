"""Faithful test doubles of the Open WebUI runtime a single-file pipe Function sees.

Two flavours:

* ``"sync"``  -- the 0.6.28 surface (sync DB model methods, ``get_db`` only, no
  ``models.config``; module name ``function_<id>``; no finish chunk/[DONE] after an
  async generator; usage only from chunks with empty ``choices``).
* ``"async"`` -- the 0.12.4 surface (``async def`` DB methods with ``db=None``,
  ``get_async_db_context``, ``models.config.Config.get``; ``function_<id>_<uuid>``;
  finish chunk + ``[DONE]`` after every non-dict result; usage merged from any chunk).

Public API::

    handle = install("async", data_dir=tmp_path)        # fake open_webui in sys.modules
    handle.add_user("u1", role="admin"); handle.add_chat("c1", user_id="u1", messages=[...])
    pipe, frontmatter = load_function(source, "my_pipe", "async")
    models = await list_models(pipe, "my_pipe", stored_valves={...})
    res = await call_pipe(pipe, body={...}, user={"id": "u1"}, stored_valves={...},
                          user_valves=None, metadata=None, tools=None, files=[],
                          event_emitter=EventRecorder())
    res.sse_payloads, res.chunks, res.text, res.reasoning, res.usage, res.error, res.raw
    uninstall()

Each stub file carries the real source lines it mirrors (W06 = 0.6.28 wheel, OW =
0.12.4 wheel); ``tests/unit/test_owui_stubs.py`` checks the signatures against the
real wheels.
"""

from ._events import EventRecorder
from ._install import (
    FLAVOUR_VERSIONS,
    FLAVOURS,
    STUB_MODULES,
    StubHandle,
    current,
    install,
    installed_flavour,
    make_user,
    uninstall,
)
from ._loader import LoadedFunction, extract_frontmatter, load_function, replace_imports
from ._shim import CallResult, call_pipe, list_models, merge_usage

__all__ = [
    "FLAVOURS",
    "FLAVOUR_VERSIONS",
    "STUB_MODULES",
    "CallResult",
    "EventRecorder",
    "LoadedFunction",
    "StubHandle",
    "call_pipe",
    "current",
    "extract_frontmatter",
    "install",
    "installed_flavour",
    "list_models",
    "load_function",
    "make_user",
    "merge_usage",
    "replace_imports",
    "uninstall",
]
