"""What a local answer must pass before it counts as delegated work, per alias (config.yaml `delegate.checks`).

A check reads one whole answer and says why it fails, or nothing. An answer that fails is not handed to the
client while a better one can be had: the proxy asks further down the alias's chain, or the alias's
`escalate_to` deployment (server/escalation.py), and the usage row records each verdict, so savings count
only answers that passed.

The checks are cheap and certain rather than clever: each fails only what is plainly unusable (nothing said,
a reply looping on itself, Python that does not parse, JSON that was asked for and is not there), so a
check that passes never escalates a good answer. Checks that only make sense for one kind of request say
"not applicable" by passing: `json` and `review_findings` judge answers to requests that asked for JSON.

The standard library and proxy/review only: settings.py imports this to name the checks at start-up.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.review.findings import parse_findings
from proxy.review.repetition import repetition

FENCE = re.compile(r"^```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
PYTHON = {"python", "py", "python3", "py3"}
JSON_LANGS = {"json"}


@dataclass(frozen=True)
class Answer:
    """One whole answer, as the checks see it."""

    text: str
    tool_calls: int = 0  # a tool call is an answer too
    finish_reason: str | None = None
    response_format: dict[str, Any] | None = None  # what the request asked for


Check = Callable[[Answer], "str | None"]  # why the answer fails, or None


def not_empty(answer: Answer) -> str | None:
    return None if answer.text.strip() or answer.tool_calls else "the answer is empty"


def not_repetitive(answer: Answer) -> str | None:
    at = repetition(answer.text)
    return None if at is None else f"the answer degenerates into repetition from character {at}"


def code_parses(answer: Answer) -> str | None:
    """Every fenced block labelled Python or JSON parses. Blocks in other languages, and an answer with no fenced
    code, pass: nothing here can judge them. A last block cut off by max_tokens was never closed, so it is
    not judged either (the client chose the limit)."""
    for n, match in enumerate(FENCE.finditer(answer.text), 1):
        lang, code = match.group(1).lower(), match.group(2)
        if lang in PYTHON:
            try:
                ast.parse(code)
            except (SyntaxError, ValueError) as e:
                return f"code block {n} (Python) does not parse: {e.msg if isinstance(e, SyntaxError) else e} " \
                       f"at line {getattr(e, 'lineno', '?')}"
        elif lang in JSON_LANGS:
            try:
                json.loads(code)
            except ValueError as e:
                return f"code block {n} (JSON) does not parse: {e}"
    return None


def _asked_for_json(answer: Answer) -> bool:
    kind = (answer.response_format or {}).get("type")
    return kind in ("json_object", "json_schema")


def json_answer(answer: Answer) -> str | None:
    """A request that asked for JSON (response_format) got a JSON value, and one of the schema's top-level type
    and required keys when it gave a schema."""
    if not _asked_for_json(answer) or answer.tool_calls:
        return None
    try:
        value = json.loads(answer.text)
    except ValueError as e:
        return f"JSON was asked for and the answer is not JSON: {e}"
    schema = ((answer.response_format or {}).get("json_schema") or {}).get("schema")
    if isinstance(schema, dict):
        if schema.get("type") == "object" and not isinstance(value, dict):
            return "the schema asks for an object"
        missing = [k for k in schema.get("required") or [] if isinstance(value, dict) and k not in value]
        if missing:
            return f"the answer lacks required keys: {', '.join(map(str, missing))}"
    return None


def review_findings(answer: Answer) -> str | None:
    """An answer to a request that asked for JSON holds findings in the review's shape (proxy/review/findings.py)."""
    if not _asked_for_json(answer) or answer.tool_calls:
        return None
    return None if parse_findings(answer.text, "-") is not None else "the answer holds no findings in the review's shape"


CHECKS: dict[str, Check] = {
    "not_empty": not_empty,
    "not_repetitive": not_repetitive,
    "code_parses": code_parses,
    "json": json_answer,
    "review_findings": review_findings,
}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    check: str | None = None  # the first check that failed
    reason: str | None = None

    def __str__(self) -> str:
        return "passed" if self.passed else f"failed {self.check}: {self.reason}"


@dataclass(frozen=True)
class AliasChecks:
    """An alias's checks, and where an answer that fails them goes."""

    names: tuple[str, ...]
    escalate_to: str | None = None  # a model group; unset: on down the alias's chain
    hold_streams: bool = False  # a stream is answered only once checked (else checked after, and recorded)

    def judge(self, answer: Answer) -> Verdict:
        for name in self.names:
            reason = CHECKS[name](answer)
            if reason is not None:
                return Verdict(False, name, reason[:300])
        return Verdict(True)
