"""A request's JSON body, read once for both APIs: a clear 400 for anything that is not a JSON object a
model can take, never an exception that turns into a 500.

Half of a UTF-16 surrogate pair ("\\ud800", legal in JSON's escapes) is no text a tokenizer or a UTF-8
encoder can take: each becomes U+FFFD, the replacement character, as in the proxy (serving/json_body.py).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from serving.json_body import no_constants, without_lone_surrogates
from tinygrad_backend.errors import APIError, from_validation

Shape = TypeVar("Shape", bound=BaseModel)


async def json_object(request: Request, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body as a JSON object; `empty` stands for an empty body where the route allows one."""
    raw = await request.body()
    if not raw.strip() and empty is not None:
        return empty
    try:
        body = without_lone_surrogates(json.loads(raw, parse_constant=no_constants))
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
