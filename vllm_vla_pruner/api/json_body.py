"""Request bodies -> JSON, with the nesting depth bounded before the decoder recurses.

CPython's ``json`` decoder recurses once per ``[`` / ``{``; a body of 100k brackets (100 kB,
well inside the size limit) ends in ``RecursionError`` deep in the stack, which a route
would answer 500. No valid request nests deeper than a few levels, so the depth is checked
on the raw bytes first, in C-speed passes (``bytes.count`` and numpy, no per-byte Python
loop; an 8 MiB body of brackets takes 0.1-0.4 s on a loaded 2-core machine, where
``json.loads`` of a flat 8 MiB list takes 1.6-3.4 s; a normal request, 2 ``count`` calls):

1. a body with at most ``max_depth`` opening brackets cannot be deeper (every real request
   stops here);
2. otherwise the bytes inside string literals are masked (quotes escaped by an odd run of
   backslashes do not end a string) and the running depth is a cumulative sum of +1 for
   ``[``/``{`` and -1 for ``]``/``}``.

The scan reads bytes, so the body must be UTF-8 (RFC 8259's interchange encoding): in
UTF-16/32, code units such as U+2200 contain a quote byte and would fool the string mask.

One function for every place that decodes a body (``/v1/actions`` on the vLLM server and
the Ray fleet ingress), so both answer the same 400.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from vllm_vla_pruner.api.protocol import ApiError

__all__ = ["MAX_JSON_DEPTH", "json_depth_error", "parse_json_body"]

#: Deepest nesting accepted; an action request needs 2 (body -> pruning).
MAX_JSON_DEPTH = 64

_KEY_BEFORE = re.compile(rb'"([A-Za-z0-9_.-]{1,64})"\s*:\s*$')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_DELTA = np.zeros(256, dtype=np.int8)
_DELTA[[ord("["), ord("{")]] = 1
_DELTA[[ord("]"), ord("}")]] = -1


def json_depth_error(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> ApiError | None:
    """The 400 for a body nested deeper than ``max_depth``, else None (the body may still
    be invalid JSON: that is the decoder's to say)."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None
    raw = np.frombuffer(body, dtype=np.uint8)
    depth = _depth(raw)
    over = depth > max_depth
    if not over.any():
        return None
    first = int(over.argmax())
    field = _top_level_key(body, depth, first)
    where = f"{field}: " if field else "request body: "
    return ApiError(
        400,
        f"{where}JSON nested deeper than {max_depth} levels; a request needs far fewer",
        field=field,
    )


def _depth(raw: np.ndarray) -> np.ndarray:
    """Nesting depth after each byte, brackets inside string literals not counted."""
    quotes = np.flatnonzero(raw == _QUOTE)
    escaped = quotes[(quotes > 0) & (raw[np.maximum(quotes - 1, 0)] == _BACKSLASH)]
    if len(escaped):
        # A quote is escaped when the run of backslashes before it has odd length.
        bs = raw == _BACKSLASH
        starts = np.flatnonzero(bs & ~np.concatenate(([False], bs[:-1])))
        run = escaped - starts[np.searchsorted(starts, escaped - 1, side="right") - 1]
        quotes = np.setdiff1d(quotes, escaped[run % 2 == 1], assume_unique=True)
    toggle = np.zeros(len(raw), dtype=np.int8)
    toggle[quotes] = 1
    outside = (np.cumsum(toggle, dtype=np.int32) & 1) == 0  # a closing quote counts outside
    return np.cumsum(_DELTA[raw] * outside, dtype=np.int32)


def _top_level_key(body: bytes, depth: np.ndarray, first: int) -> str | None:
    """The body's top-level field whose value holds position ``first`` (None: no object)."""
    if body.lstrip()[:1] != b"{" or first == 0:
        return None
    at_top = depth[first - 1 :: -1] == 1
    back = int(at_top.argmax())
    if not at_top[back]:
        return None
    end = first - back  # the value's opening bracket follows the last byte at depth 1
    m = _KEY_BEFORE.search(body, max(0, end - 128), end)
    return m.group(1).decode() if m else None


def parse_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Body bytes -> decoded JSON; ApiError 400 for non-JSON, non-UTF-8 or too deep nesting."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        raise ApiError(400, "request body must be JSON encoded as UTF-8", field=None)
    err = json_depth_error(body, max_depth)
    if err is not None:
        raise err
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", field=None) from None
    except RecursionError:  # unreachable with max_depth far below the interpreter's limit
        raise ApiError(400, "request body: JSON nested too deeply", field=None) from None
