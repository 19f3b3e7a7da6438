"""Code review of a diff by the `review` alias: findings pinned to lines, as Markdown, JSON or SARIF.

The diff is split by file and hunk into pieces that fit the served model's context. Each piece is sent
with its new-side line numbers, asking for findings in one fixed JSON shape: in the prompt, and as a JSON
schema in response_format (FINDINGS_SCHEMA), which a backend that supports it holds every token to. A
backend that ignores it may still write anything, so what comes back is validated; a reply that is not valid
JSON is repaired where that is safe (code fences, prose around the object, severity synonyms, the whole
findings of an array cut off by max_tokens), asked for again once, and otherwise kept as a plain-text note: a
reviewer never crashes on what a small model writes. A reply that degenerated into repetition
(proxy/review/repetition.py) is not asked again: what it held before the loop is kept, with a note. Every
finding is moved to a line that exists on the diff's new side, once. Client-side: no litellm here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.review.diff import FileDiff, Hunk
from proxy.review.repetition import repetition

SEVERITIES = ("high", "medium", "low")
_SYNONYMS = {"critical": "high", "blocker": "high", "error": "high", "major": "medium", "warning": "medium",
             "moderate": "medium", "minor": "low", "info": "low", "note": "low", "nit": "low", "trivial": "low"}
SYSTEM = (
    "You review code changes. Reply with JSON only, no prose, in exactly this shape: "
    '{"findings": [{"severity": "high|medium|low", "file": "<path>", "line": <new line number>, '
    '"message": "<what is wrong>", "suggestion": "<how to fix it>"}]}. '
    'Report real bugs, security problems and risky code; if there are none, reply {"findings": []}.'
)
FINDINGS_SCHEMA: dict[str, Any] = {  # the shape SYSTEM describes, in the subset strict json_schema allows
    "type": "object",
    "properties": {"findings": {"type": "array", "items": {
        "type": "object",
        "properties": {"severity": {"type": "string", "enum": list(SEVERITIES)}, "file": {"type": "string"},
                       "line": {"type": "integer"}, "message": {"type": "string"}, "suggestion": {"type": "string"}},
        "required": ["severity", "file", "line", "message", "suggestion"],
        "additionalProperties": False,
    }}},
    "required": ["findings"],
    "additionalProperties": False,
}
RESPONSE_FORMAT: dict[str, Any] = {"type": "json_schema",
                                   "json_schema": {"name": "findings", "schema": FINDINGS_SCHEMA, "strict": True}}
RETRY = "That was not valid JSON in the required shape. Reply again with JSON only: {\"findings\": [...]}"
_COMMA = re.compile(r"\s*,")
CHARS_PER_TOKEN = 3  # conservative for code: a piece sized by this fits the context


class ReviewError(Exception):
    """The review cannot run: no diff, no repository, no proxy. One clear sentence."""


@dataclass
class Finding:
    severity: str
    file: str
    line: int
    message: str
    suggestion: str = ""
    moved_from: int | None = None  # the line the model named, when it was not on the new side


@dataclass
class Piece:
    path: str
    hunks: list[Hunk]

    def text(self) -> str:
        return f"File: {self.path}\n" + "\n".join(h.numbered() for h in self.hunks)


@dataclass
class Review:
    findings: list[Finding] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (file, plain-text reply that was not JSON)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    pieces: int = 0


# --- splitting --------------------------------------------------------------------------------------------

def split(files: list[FileDiff], max_chars: int) -> tuple[list[Piece], list[tuple[str, str]]]:
    """Pieces of at most `max_chars` of diff each, whole hunks where they fit, one file per piece."""
    pieces, skipped = [], []
    for f in files:
        if f.binary:
            skipped.append((f.path, "binary file"))
            continue
        if f.deleted or not f.added:
            skipped.append((f.path, "deleted" if f.deleted else "no added lines"))
            continue
        current: list[Hunk] = []
        size = 0
        for hunk in f.hunks:
            for part in _cut(hunk, max_chars):
                n = len(part.numbered())
                if current and size + n > max_chars:
                    pieces.append(Piece(f.path, current))
                    current, size = [], 0
                current.append(part)
                size += n
        if current:
            pieces.append(Piece(f.path, current))
    return pieces, skipped


def _cut(hunk: Hunk, max_chars: int) -> list[Hunk]:
    """A hunk longer than a piece is cut into runs of its lines (each keeps its line numbers)."""
    if len(hunk.numbered()) <= max_chars:
        return [hunk]
    parts, current, size = [], Hunk(hunk.header), len(hunk.header)
    for line in hunk.lines:
        n = len(line[2]) + 8
        if current.lines and size + n > max_chars:
            parts.append(current)
            current, size = Hunk(hunk.header + " (continued)"), len(hunk.header)
        current.lines.append(line)
        size += n
    parts.append(current)
    return parts


# --- reading the model's reply -------------------------------------------------------------------------

def extract_json(reply: str) -> Any | None:
    """The JSON value in a reply: bare, inside ``` fences, or the outermost {...}/[...] amid prose."""
    text = reply.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [text] + ([fenced.group(1)] if fenced else [])
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def complete_items(reply: str) -> list[Any]:
    """The whole values at the start of a findings array that was cut off (by max_tokens, or a loop stopped)."""
    opened = re.search(r'"(?:findings|issues)"\s*:\s*\[|^\s*\[', reply)
    if opened is None:
        return []
    decoder, items, at = json.JSONDecoder(), list[Any](), opened.end()
    while True:
        try:
            item, at = decoder.raw_decode(reply, len(reply) - len(reply[at:].lstrip()))
        except ValueError:
            return items
        items.append(item)
        comma = _COMMA.match(reply, at)
        if comma is None:
            return items
        at = comma.end()


def parse_findings(reply: str, default_file: str) -> list[Finding] | None:
    """Findings from a reply, or None when it holds no usable JSON in the required shape."""
    data = extract_json(reply)
    if data is None:
        data = complete_items(reply) or None
    if isinstance(data, dict):
        data = data.get("findings", data.get("issues"))
    if not isinstance(data, list):
        return None
    findings = []
    for item in data:
        if not isinstance(item, dict):
            return None
        message = str(item.get("message") or item.get("description") or "").strip()
        if not message:
            continue
        severity = str(item.get("severity") or "medium").strip().lower()
        severity = _SYNONYMS.get(severity, severity if severity in SEVERITIES else "medium")
        try:
            line = int(str(item.get("line", 0)).split("-")[0].strip() or 0)
        except ValueError:
            line = 0
        findings.append(Finding(severity, str(item.get("file") or default_file), line, message,
                                str(item.get("suggestion") or "").strip()))
    return findings


def pin(finding: Finding, files: dict[str, FileDiff], piece: Piece) -> Finding:
    """Move a finding to a line that exists on the diff's new side: its own, or the nearest added line."""
    path = finding.file if finding.file in files else _match_path(finding.file, files) or piece.path
    f = files[path]
    lines = f.new_lines
    line = finding.line
    if line not in lines:
        candidates = f.added or sorted(lines)
        near = [n for h in piece.hunks for n in h.added] or candidates
        line_new = min(near, key=lambda n: abs(n - finding.line)) if near else 1
        return Finding(finding.severity, path, line_new, finding.message, finding.suggestion, moved_from=finding.line)
    return Finding(finding.severity, path, line, finding.message, finding.suggestion)


def _match_path(name: str, files: dict[str, FileDiff]) -> str | None:
    name = name.strip().removeprefix("b/").removeprefix("./")
    hits = [p for p in files if p == name or p.endswith("/" + name)]
    return hits[0] if len(hits) == 1 else None


# --- running it -----------------------------------------------------------------------------------------

Ask = Callable[[list[dict[str, str]]], str]


def review(files: list[FileDiff], ask: Ask, max_chars: int,
           progress: Callable[[int, int, str], None] | None = None) -> Review:
    pieces, skipped = split(files, max_chars)
    by_path = {f.path: f for f in files}
    result = Review(skipped=skipped, pieces=len(pieces))
    for i, piece in enumerate(pieces, start=1):
        if progress:
            progress(i, len(pieces), piece.path)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": piece.text()}]
        reply = ask(messages)
        found, looped = _read(reply, piece.path)
        if found is None and looped is None:  # a loop would only loop again
            reply = ask([*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": RETRY}])
            found, looped = _read(reply, piece.path)
        if looped is not None:
            kept = "; the findings before it were kept" if found else ""
            result.notes.append((piece.path, f"(the reply began repeating itself after {looped} characters and was "
                                             f"dropped from there{kept}) {reply[:min(looped, 300)].strip()}"))
        elif found is None:
            result.notes.append((piece.path, reply.strip()))
        result.findings.extend(pin(f, by_path, piece) for f in found or [])
    unique = {(f.severity, f.file, f.line, f.message): f for f in result.findings}  # a loop may repeat a finding
    result.findings = sorted(unique.values(), key=lambda f: (SEVERITIES.index(f.severity), f.file, f.line))
    return result


def _read(reply: str, path: str) -> tuple[list[Finding] | None, int | None]:
    """The findings in a reply, and where it degenerated into repetition (asked only of a reply that is not whole
    JSON: a findings array repeats its keys by design)."""
    found = parse_findings(reply, path)
    looped = repetition(reply) if extract_json(reply) is None else None
    return found, looped


def worst(result: Review) -> str | None:
    return result.findings[0].severity if result.findings else None


def fails(result: Review, fail_on: str | None) -> bool:
    if fail_on is None:
        return False
    limit = SEVERITIES.index(fail_on)
    return any(SEVERITIES.index(f.severity) <= limit for f in result.findings)


# --- output ---------------------------------------------------------------------------------------------

def to_markdown(result: Review) -> str:
    out = ["# Code review", ""]
    counts = {s: sum(f.severity == s for f in result.findings) for s in SEVERITIES}
    out.append(f"{len(result.findings)} findings ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
               f"in {result.pieces} piece{'s' if result.pieces != 1 else ''} of the diff.")
    out.append("")
    for f in result.findings:
        moved = f" (the model said line {f.moved_from})" if f.moved_from is not None else ""
        out.append(f"- **{f.severity}** `{f.file}:{f.line}`{moved}: {f.message}")
        if f.suggestion:
            out.append(f"  - suggestion: {f.suggestion}")
    for path, text in result.notes:
        out += ["", f"## Notes on `{path}` (the reply was not in the findings format)", "", text]
    if result.skipped:
        out += ["", "Skipped: " + ", ".join(f"`{p}` ({why})" for p, why in result.skipped)]
    return "\n".join(out) + "\n"


def to_json(result: Review) -> str:
    return json.dumps({"findings": [asdict(f) for f in result.findings],
                       "notes": [{"file": p, "text": t} for p, t in result.notes],
                       "skipped": [{"file": p, "reason": r} for p, r in result.skipped]}, indent=2)


def to_sarif(result: Review) -> str:
    """SARIF 2.1.0, the format GitHub code scanning and other UIs read."""
    level = {"high": "error", "medium": "warning", "low": "note"}
    results = [{
        "ruleId": f"delegate-review/{f.severity}",
        "level": level[f.severity],
        "message": {"text": f.message + (f"\nSuggestion: {f.suggestion}" if f.suggestion else "")},
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": f.file, "uriBaseId": "%SRCROOT%"},
                                            "region": {"startLine": f.line}}}],
    } for f in result.findings]
    rules = [{"id": f"delegate-review/{s}", "name": f"{s}-severity finding",
              "shortDescription": {"text": f"A {s}-severity finding from a local model's review"},
              "defaultConfiguration": {"level": level[s]}} for s in SEVERITIES]
    return json.dumps({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
        "runs": [{"tool": {"driver": {"name": "delegate review", "informationUri": "https://github.com/",
                                      "rules": rules}}, "results": results}],
    }, indent=2)
