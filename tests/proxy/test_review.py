"""Review logic on fixed model outputs: splitting, JSON repair, pinning findings to lines, SARIF."""

from __future__ import annotations

import json

import pytest

from proxy.review import diff, repetition
from proxy.review import findings as review

DIFF = """diff --git a/app/util.py b/app/util.py
index 1111111..2222222 100644
--- a/app/util.py
+++ b/app/util.py
@@ -10,5 +10,7 @@ def load(path):
     with open(path) as f:
         data = f.read()
-    return data
+    result = eval(data)
+    return result
+
 def save(path, data):
     pass
@@ -40,2 +42,3 @@ def other():
     x = 1
+    y = x / 0
     return x
diff --git a/logo.png b/logo.png
index 3333333..4444444 100644
Binary files a/logo.png and b/logo.png differ
diff --git a/gone.py b/gone.py
deleted file mode 100644
--- a/gone.py
+++ /dev/null
@@ -1,2 +0,0 @@
-a = 1
-b = 2
"""


def files() -> list[diff.FileDiff]:
    return diff.parse(DIFF)


def test_parse_tags_new_side_lines() -> None:
    util, logo, gone = files()
    assert (util.path, logo.binary, gone.deleted) == ("app/util.py", True, True)
    assert util.added == [12, 13, 14, 43]
    assert {10, 11, 12, 15, 42, 43, 44} <= util.new_lines
    assert 9 not in util.new_lines


def test_split_skips_binary_and_deleted_and_fits_the_limit() -> None:
    pieces, skipped = review.split(files(), max_chars=10_000)
    assert [p.path for p in pieces] == ["app/util.py"] and len(pieces[0].hunks) == 2
    assert dict(skipped) == {"logo.png": "binary file", "gone.py": "deleted"}
    small, _ = review.split(files(), max_chars=200)
    assert len(small) >= 2 and all(p.path == "app/util.py" for p in small)
    assert all(len(p.text()) <= 200 + len("File: app/util.py\n") + 40 for p in small)


def test_long_hunk_is_cut_and_keeps_line_numbers() -> None:
    text = "diff --git a/big.py b/big.py\n--- a/big.py\n+++ b/big.py\n@@ -0,0 +1,400 @@\n" + "".join(
        f"+line {i} = {i} * 2\n" for i in range(1, 401))
    pieces, _ = review.split(diff.parse(text), max_chars=1500)
    assert len(pieces) > 5
    numbers = [n for p in pieces for h in p.hunks for n in h.added]
    assert numbers == list(range(1, 401))  # every line reviewed once, numbered as in the file


ITEM = '"line": 12, "message": "eval of file data", "suggestion": "use json.loads"'


@pytest.mark.parametrize("reply", [
    '{"findings": [{"severity": "high", "file": "app/util.py", ' + ITEM + '}]}',
    'Here is my review:\n```json\n{"findings": [{"severity": "HIGH", "file": "app/util.py", ' + ITEM + '}]}\n```\nBye',
    'Sure! {"findings": [{"severity": "critical", "file": "util.py", ' + ITEM.replace("12", '"12"') + '}]} done',
    '[{"severity": "high", "file": "app/util.py", ' + ITEM.replace("message", "description") + '}]',
])
def test_replies_are_repaired_into_findings(reply: str) -> None:
    found = review.parse_findings(reply, "app/util.py")
    assert found is not None and len(found) == 1
    f = review.pin(found[0], {x.path: x for x in files()}, review.split(files(), 10_000)[0][0])
    assert (f.severity, f.file, f.line, f.message) == ("high", "app/util.py", 12, "eval of file data")


@pytest.mark.parametrize("reply", ["The code looks fine to me.", "{not json", '{"findings": "none"}', '[1, 2]', ""])
def test_unusable_replies_are_none(reply: str) -> None:
    assert review.parse_findings(reply, "x.py") is None


def test_lines_not_on_the_new_side_move_to_the_nearest_added_line() -> None:
    fs = {x.path: x for x in files()}
    piece = review.split(files(), 10_000)[0][0]
    moved = review.pin(review.Finding("low", "app/util.py", 3, "m"), fs, piece)
    assert (moved.line, moved.moved_from) == (12, 3)
    far = review.pin(review.Finding("low", "elsewhere.py", 41, "m"), fs, piece)
    assert (far.file, far.line) == ("app/util.py", 43)


def test_invalid_reply_is_asked_again_then_kept_as_a_note() -> None:
    calls = []

    def ask(messages: list[dict[str, str]]) -> str:
        calls.append(messages)
        return "Looks good overall, but eval is risky."

    result = review.review(files(), ask, 10_000)
    assert len(calls) == 2 and calls[1][-1]["content"] == review.RETRY  # asked again once
    assert result.findings == [] and result.notes == [("app/util.py", "Looks good overall, but eval is risky.")]
    assert "Notes on `app/util.py`" in review.to_markdown(result)


def test_second_answer_is_used_when_valid() -> None:
    replies = iter(["no json here", '{"findings": [{"severity": "medium", "line": 43, "message": "division by zero"}]}'])
    result = review.review(files(), lambda m: next(replies), 10_000)
    assert [(f.severity, f.file, f.line) for f in result.findings] == [("medium", "app/util.py", 43)]


def test_sarif_and_fail_on() -> None:
    replies = iter(['{"findings": [{"severity": "low", "file": "app/util.py", "line": 13, "message": "naming"},'
                    '{"severity": "high", "file": "app/util.py", "line": 12, "message": "eval", "suggestion": "json"}]}'])
    result = review.review(files(), lambda m: next(replies), 10_000)
    sarif = json.loads(review.to_sarif(result))
    assert sarif["version"] == "2.1.0"
    results = sarif["runs"][0]["results"]
    assert [r["level"] for r in results] == ["error", "note"]
    assert results[0]["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "app/util.py", "uriBaseId": "%SRCROOT%"}, "region": {"startLine": 12}}
    rule_ids = {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]}
    assert {r["ruleId"] for r in results} <= rule_ids
    assert review.fails(result, "high") and review.fails(result, "low") and not review.fails(result, None)
    assert json.loads(review.to_json(result))["findings"][0]["severity"] == "high"
    low_only = review.review(files(), lambda m: '{"findings": [{"severity": "low", "line": 12, "message": "x"}]}', 10_000)
    assert not review.fails(low_only, "medium")


FINDING = '{"severity":"high","file":"app/util.py","line":12,"message":"eval of file data","suggestion":"json.loads"}'


@pytest.mark.parametrize("text", [
    '{"findings":[' + ",".join([FINDING] * 12),  # one finding written until max_tokens
    '{"findings":[{"severity":"high","file":"a.py","line":3,"message":"' + "the value is not checked " * 40,
    "Here is the review.\n" + "\n".join(["The function does not check its input."] * 10) + "\nThat is all.",
    "".join(f"{i}. The function does not check its input. " for i in range(1, 12)),  # a counter between copies
    "!" * 300,
])
def test_degenerate_replies_are_recognised(text: str) -> None:
    at = repetition.repetition(text)
    assert at is not None and 0 < at < len(text) // 2


@pytest.mark.parametrize("text", [
    json.dumps({"findings": [{"severity": "low", "file": "a.py", "line": n, "message": m, "suggestion": "fix it"}
                             for n, m in enumerate(["unused import", "eval of input", "no timeout", "bare except"] * 3)]}),
    "=" * 80 + "\nThe function divides by b without checking it.\n" + "=" * 80,
    DIFF,
    "The code looks fine. The tests cover it. The names are clear. Nothing to add.",
    "",
])
def test_ordinary_replies_are_not_degenerate(text: str) -> None:
    assert repetition.looping_tail(text) is None
    if not text.startswith("{"):  # whole JSON repeats its keys by design: review._read never asks it of one
        assert repetition.repetition(text) is None


def test_a_findings_array_cut_off_keeps_its_whole_findings() -> None:
    cut = '```json\n{"findings": [' + FINDING + ", " + FINDING.replace("12", "13") + ', {"severity": "lo'
    found = review.parse_findings(cut, "app/util.py")
    assert found is not None and [f.line for f in found] == [12, 13]
    assert review.complete_items("no array here") == [] and review.parse_findings("[{", "x.py") is None


def test_a_looping_reply_is_not_asked_again_and_its_findings_are_kept_once() -> None:
    calls = []

    def ask(messages: list[dict[str, str]]) -> str:
        calls.append(messages)
        return '{"findings":[' + ",".join([FINDING] * 12)

    result = review.review(files(), ask, 10_000)
    assert len(calls) == 1
    assert [(f.line, f.message) for f in result.findings] == [(12, "eval of file data")]
    assert len(result.notes) == 1 and "began repeating itself" in result.notes[0][1]


def test_a_loop_with_nothing_before_it_is_dropped_with_a_note() -> None:
    result = review.review(files(), lambda m: "I think that " * 100, 10_000)
    assert result.findings == [] and len(result.notes) == 1
    assert result.notes[0][1].startswith("(the reply began repeating itself after ")
    assert len(result.notes[0][1]) < 400


def test_the_findings_schema_is_strict_and_matches_the_prompt() -> None:
    fmt = review.RESPONSE_FORMAT
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    item = schema["properties"]["findings"]["items"]
    assert set(item["required"]) == set(item["properties"]) == {"severity", "file", "line", "message", "suggestion"}
    assert item["properties"]["severity"]["enum"] == list(review.SEVERITIES)
    assert schema["additionalProperties"] is False and item["additionalProperties"] is False


class _Stream:
    """A stream that never ends, looping on one phrase; it counts what was read and whether it was closed."""

    def __init__(self, first: str, loop: str) -> None:
        self.first, self.loop, self.read, self.closed = first, loop, 0, False

    def __iter__(self):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        def chunk(text: str) -> SimpleNamespace:
            return SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=text))])

        yield chunk(self.first)
        while not self.closed:
            self.read += 1
            yield chunk(self.loop)

    def close(self) -> None:
        self.closed = True


def test_a_looping_stream_stops_being_read() -> None:
    from proxy.review.cli import read_stream

    stream = _Stream('{"findings":[{"severity":"high","file":"a.py","line":3,"message":"', "and again ")
    text = read_stream(stream)
    assert stream.closed and stream.read < 60  # a few hundred characters, not max_tokens
    assert repetition.looping_tail(text) is not None
