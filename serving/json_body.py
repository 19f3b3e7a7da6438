"""What a client's JSON body may not carry, read the same way by the proxy (validation.py) and the backend
(request_body.py): NaN and Infinity, which Python's json takes and JSON has not, and half of a UTF-16
surrogate pair ("\\ud800", legal in JSON's escapes), which no tokenizer or UTF-8 encoder can take."""

from __future__ import annotations

import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def no_constants(name: str) -> float:
    """json.loads's parse_constant: NaN, Infinity and -Infinity are refused (a ValueError, as for any bad JSON)."""
    raise ValueError(f"{name} is not valid JSON")


def without_lone_surrogates(value: Any) -> Any:
    """The decoded body with each lone surrogate replaced by U+FFFD, the replacement character, as any UTF-8
    system does; the rest of the text stays as sent."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value
