"""Credentials never leave the process: URL values are redacted before they reach MLflow params, tags, manifests or
logs.

The config never holds a secret on purpose (only the names of the env vars that do), but a URL value can carry one by
accident: ``https://user:token@mlflow.example.org``, ``http://host/v1?api_key=...``. What is redacted: the userinfo of
any URL (``user:password@``) and the values of query parameters whose name looks like a credential. The rest of the
URL stays, so a reader still sees which server was used.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAM = re.compile(r"(key|token|secret|password|passwd|pwd|signature|credential|auth|sig)", re.I)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


def redact(value: Any) -> Any:
    """``value`` with every URL in every string redacted, recursively through dicts, lists and tuples."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
