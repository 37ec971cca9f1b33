"""Re-implementation of Open WebUI's Function loader (``open_webui.utils.plugin``).

What it reproduces, per version:

* ``extract_frontmatter`` (W06 utils/plugin.py:18-51 == OW utils/plugin.py:153-186):
  only when ``content.splitlines()[0].strip() == '\"\"\"'``; then every following line
  matching ``^\\s*([a-z_]+):\\s*(.*)\\s*$`` (case-insensitive) up to the first line that
  *contains* ``\"\"\"``; values are stripped strings.
* ``replace_imports`` (W06 :54-68, OW :189-203): plain ``str.replace`` over the whole
  source -- strings and comments included -- of ``from utils``/``from apps``/
  ``from main``/``from config`` with ``from open_webui.<x>``.  The create/update routers
  apply it before loading (W06 routers/functions.py:180, OW routers/functions.py:225)
  and the rewritten text is what gets stored and exec'd afterwards.
* ``load_function_module_by_id`` (W06 :118-166, OW :260-312): a fresh
  ``types.ModuleType`` registered in ``sys.modules`` while exec'ing -- named
  ``function_<id>`` in 0.6.28, ``function_<id>_<uuid4 hex>`` in 0.12.4 -- whose
  ``__file__`` is a temp file holding the source, deleted right after loading.
  ``exec(content, module.__dict__)`` (a string, so tracebacks show ``<string>``).  Class
  detection order Pipe, Filter, Action (+ Event in 0.12), instantiated with no arguments;
  otherwise a plain ``Exception("No Function class found in the module")``.
* ``sys.modules`` afterwards: 0.6.28 leaves ``function_<id>`` registered (removed only on
  error); 0.12.4 pops the uuid name in ``finally`` and the cache then publishes the module
  under both the uuid name and the alias ``function_<id>`` (OW :343-350).

Not reproduced: pip-installing ``requirements`` (returned in the frontmatter for the
caller to check), ``ENABLE_FUNCTIONS`` switches, and DB writes.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import types
import uuid
from typing import Any

_FRONTMATTER_LINE = re.compile(r"^\s*([a-z_]+):\s*(.*)\s*$", re.IGNORECASE)
_REPLACEMENTS = (
    ("from utils", "from open_webui.utils"),
    ("from apps", "from open_webui.apps"),
    ("from main", "from open_webui.main"),
    ("from config", "from open_webui.config"),
)
_CLASS_ORDER = {
    "sync": (("Pipe", "pipe"), ("Filter", "filter"), ("Action", "action")),
    "async": (("Pipe", "pipe"), ("Filter", "filter"), ("Action", "action"), ("Event", "event")),
}

_LOADED_MODULE_NAMES: set[str] = set()


def extract_frontmatter(content: str) -> dict[str, str]:
    result: dict[str, str] = {}
    lines = content.splitlines()
    if not lines or lines[0].strip() != '"""':
        return {}
    for line in lines[1:]:
        if '"""' in line:
            break
        match = _FRONTMATTER_LINE.match(line)
        if match:
            key, value = match.groups()
            result[key.strip()] = value.strip()
    return result


def replace_imports(content: str) -> str:
    for old, new in _REPLACEMENTS:
        content = content.replace(old, new)
    return content


class LoadedFunction(tuple):
    """``(instance, frontmatter)`` plus ``.type``, ``.module`` and ``.module_name``."""

    instance: Any
    frontmatter: dict
    type: str
    module: types.ModuleType
    module_name: str

    def __new__(cls, instance: Any, frontmatter: dict, type_: str, module: types.ModuleType):
        self = super().__new__(cls, (instance, frontmatter))
        self.instance = instance
        self.frontmatter = frontmatter
        self.type = type_
        self.module = module
        self.module_name = module.__name__
        return self


def load_function(source: str, function_id: str, flavour: str = "async") -> LoadedFunction:
    """Load ``source`` the way Open WebUI does on create/first use; returns
    ``(instance, frontmatter)`` (a tuple subclass that also carries ``.type``/``.module``).
    """
    if flavour not in _CLASS_ORDER:
        raise ValueError(f"unknown flavour {flavour!r}")
    content = replace_imports(source)
    frontmatter = extract_frontmatter(content)
    if flavour == "sync":
        module_name = f"function_{function_id}"
    else:
        module_name = f"function_{function_id}_{uuid.uuid4().hex}"
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module

    handle = tempfile.NamedTemporaryFile(delete=False)
    handle.close()
    succeeded = False
    try:
        with open(handle.name, "w", encoding="utf-8") as fh:
            fh.write(content)
        module.__dict__["__file__"] = handle.name
        exec(content, module.__dict__)
        for class_name, type_name in _CLASS_ORDER[flavour]:
            if hasattr(module, class_name):
                instance = getattr(module, class_name)()
                function_type = type_name
                break
        else:
            raise Exception("No Function class found in the module")
        succeeded = True
    finally:
        os.unlink(handle.name)
        if flavour == "async" or not succeeded:
            sys.modules.pop(module_name, None)

    if flavour == "sync":
        _LOADED_MODULE_NAMES.add(module_name)
    else:
        alias = f"function_{function_id}"
        previous = sys.modules.get(alias)
        if previous is not None:
            sys.modules.pop(previous.__name__, None)
        sys.modules[module_name] = module
        sys.modules[alias] = module
        _LOADED_MODULE_NAMES.update((module_name, alias))
    return LoadedFunction(instance, frontmatter, function_type, module)


def forget_loaded_modules() -> None:
    """Drop every ``function_*`` module this loader registered in ``sys.modules``."""
    for name in list(_LOADED_MODULE_NAMES):
        sys.modules.pop(name, None)
    _LOADED_MODULE_NAMES.clear()
