"""A request's JSON body, read once for both APIs: a clear 400 for anything that is not a JSON object a
model can take, never an exception that turns into a 500.

Half of a UTF-16 surrogate pair ("\\ud800", legal in JSON's escapes) is no text a tokenizer or a UTF-8
encoder can take: each becomes U+FFFD, the replacement character, as any UTF-8 system does.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tinygrad_backend.errors import APIError, from_validation

_SURROGATE = re.compile("[\ud800-\udfff]")
Shape = TypeVar("Shape", bound=BaseModel)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _text(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


async def json_object(request: Request, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body as a JSON object; `empty` stands for an empty body where the route allows one."""
    raw = await request.body()
    if not raw.strip() and empty is not None:
        return empty
    try:
        body = _text(json.loads(raw, parse_constant=_no_constants))
    except RecursionError as e:
        raise APIError(400, "the request body nests too deeply") from e
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from e
    except ValueError as e:  # json.JSONDecodeError, and NaN or Infinity
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def parse(request: Request, shape: type[Shape]) -> Shape:
    body = await json_object(request)
    try:
        return shape.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from e
    except RecursionError as e:  # deep nesting in a field the shape does not bound
        raise APIError(400, "the request body nests too deeply") from e
