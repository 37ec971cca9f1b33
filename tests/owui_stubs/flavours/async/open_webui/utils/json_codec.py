"""Stub of ``open_webui.utils.json_codec`` (0.12.4, OW utils/json_codec.py).

``ENABLE_ORJSON`` defaults to true, so ``JSONCodec.dumps`` is orjson: compact
(``{"a":1}``), raw UTF-8 (no ``\\uXXXX`` escaping) except that U+2028, U+2029 and
U+0085 are escaped so SSE frames cannot be split; objects orjson rejects (non-``str``
keys, over-large ints) and any call with extra arguments fall back to stdlib ``json``
formatting.  With ``ENABLE_ORJSON=false`` (or no orjson installed) it is stdlib ``json``.
This matters for the exact SSE text ``generate_function_chat_completion`` emits.
"""

import json as _stdlib_json

from open_webui.env import ENABLE_ORJSON

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

_LINE_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


class _OrjsonCodec:
    JSONDecodeError = _stdlib_json.JSONDecodeError

    @staticmethod
    def dumps(obj, *args, **kwargs):
        if args or (kwargs and kwargs not in ({"separators": (",", ":")}, {"ensure_ascii": False})):
            return _stdlib_json.dumps(obj, *args, **kwargs)
        try:
            text = _orjson.dumps(obj).decode("utf-8")
        except (TypeError, ValueError):
            return _stdlib_json.dumps(obj, *args, **kwargs)
        for raw, escaped in _LINE_SEPARATORS.items():
            if raw in text:
                text = text.replace(raw, escaped)
        return text

    @staticmethod
    def loads(s, *args, **kwargs):
        if args or kwargs:
            return _stdlib_json.loads(s, *args, **kwargs)
        try:
            return _orjson.loads(s)
        except (TypeError, ValueError):
            return _stdlib_json.loads(s)


JSONCodec = _OrjsonCodec if (ENABLE_ORJSON and _orjson is not None) else _stdlib_json
