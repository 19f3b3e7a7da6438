"""Checked answers: an answer that fails its alias's checks escalates, and the row says so.

The deployments are FakeBackend servers (tests/fake_backend.py) answering fixed replies: a weak one whose
Python does not parse and a strong one whose Python does. The "cloud" deployment is a FakeBackend too (no
cloud can run here), named as an OpenAI model LiteLLM's price table knows and reached on 127.0.0.2, so the
proxy takes it for a cloud deployment and prices it from that table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from proxy import settings
from proxy.routing.answer_checks import CHECKS, AliasChecks, Answer
from proxy.settings import ConfigError
from tests.conftest import write_config
from tests.fake_backend import FakeBackend
from tests.servers import ROOT, ServerThread, free_port, wait_rows

BROKEN = "Here it is:\n```python\ndef add(a, b:\n    return a + b\n```\n"
GOOD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
ASK = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


# --- the checks themselves ------------------------------------------------------------------------------

@pytest.mark.parametrize(("check", "answer", "fails"), [
    ("not_empty", Answer("  \n"), True),
    ("not_empty", Answer("", tool_calls=1), False),
    ("not_empty", Answer("ok"), False),
    ("not_repetitive", Answer("The cat sat on the mat. " * 30), True),
    ("not_repetitive", Answer("A short, ordinary answer that says one thing once."), False),
    ("code_parses", Answer(BROKEN), True),
    ("code_parses", Answer(GOOD), False),
    ("code_parses", Answer("```json\n{\"a\": 1,}\n```"), True),
    ("code_parses", Answer("```js\nconst x = {;\n```"), False),  # nothing here judges JavaScript
    ("code_parses", Answer("no code at all"), False),
    ("code_parses", Answer("```python\ndef f(:\n", finish_reason="length"), False),  # cut off: never closed
    ("json", Answer("not json", response_format={"type": "json_object"}), True),
    ("json", Answer("not json"), False),  # JSON was not asked for
    ("json", Answer('{"b": 1}', response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": ["a"]}}}), True),
    ("json", Answer('{"a": 1}', response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": ["a"]}}}), False),
    ("review_findings", Answer('{"findings": [{"severity": "high", "line": 3, "message": "x is unchecked"}]}',
                               response_format={"type": "json_object"}), False),
    ("review_findings", Answer("Looks fine to me.", response_format={"type": "json_object"}), True),
    ("review_findings", Answer("Looks fine to me."), False),  # a prose review was asked for
])
def test_each_check_fails_only_what_is_plainly_unusable(check: str, answer: Answer, fails: bool) -> None:
    reason = CHECKS[check](answer)
    assert (reason is not None) == fails, reason


def test_an_alias_reports_the_first_check_that_failed() -> None:
    verdict = AliasChecks(("not_empty", "code_parses")).judge(Answer(BROKEN))
    assert not verdict.passed and verdict.check == "code_parses" and "does not parse" in (verdict.reason or "")
    assert AliasChecks(("not_empty", "code_parses")).judge(Answer(GOOD)).passed


# --- escalation through the real proxy -------------------------------------------------------------------

@pytest.fixture
def cloud() -> Any:
    backend = FakeBackend("gpt-4o-mini", reply=GOOD)
    with ServerThread(backend.app, host="127.0.0.2") as server:
        yield backend, f"http://127.0.0.2:{server.port}/v1"


def _checked(tmp_path: Path, deployments: list[tuple[Any, ...]], fallbacks: dict[str, list[str]],
             own: dict[str, Any]) -> Path:
    return write_config(tmp_path / "c.yaml", deployments, fallbacks=fallbacks, aliases=["coding"],
                        delegate={"checks": {"every_alias": ["not_empty"], "aliases": {"coding": own}}})


def test_an_answer_whose_code_does_not_parse_goes_on_down_the_chain(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    strong, strong_url = fake_backend("strong", reply=GOOD)
    proxy = start_proxy(_checked(tmp_path, [("coding", "openai/weak", weak_url), ("strong", "openai/strong", strong_url)],
                                 {"coding": ["strong"]}, {"checks": ["code_parses"]}))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(model="coding", messages=ASK)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content == GOOD
    assert raw.headers["x-delegate-served-by"] == "openai/strong"
    assert raw.headers["x-delegate-check"] == "passed" and raw.headers["x-delegate-escalations"] == "1"
    assert len(weak.requests) == 1 and len(strong.requests) == 1
    row, = wait_rows(1)
    assert row["verdict"] == "passed" and row["escalations"] == 1 and row["fallbacks"] == 1
    assert [(c["model"], c["passed"], c["check"]) for c in row["checks"]] == [
        ("openai/weak", False, "code_parses"), ("openai/strong", True, None)]
    assert "does not parse" in row["checks"][0]["reason"]
    assert [(a["model"], a["ok"]) for a in row["attempts"]] == [("weak", True), ("strong", True)]
    # both answers drew power; the saving is what the reference would have cost less both
    assert row["local_cost"] > 0 and row["saved"] == pytest.approx(row["reference_cost"] - row["local_cost"])

    log, = httpx.get(proxy.url + "/spend/logs", timeout=30).json()
    assert (log["metadata"]["verdict"], log["metadata"]["escalations"]) == ("passed", 1)
    assert [c["passed"] for c in log["metadata"]["checks"]] == [False, True]
    day, = httpx.get(proxy.url + "/global/spend/report", params={"group_by": "task"}, timeout=30).json()
    entry, = day["tasks"]
    assert (entry["task"], entry["escalations"], entry["failed_checks"]) == ("coding", 1, 0)
    assert entry["total_escalation_cost"] == pytest.approx(row["local_cost"])


def test_escalate_to_a_cloud_model_is_priced_from_litellms_table(tmp_path: Path, fake_backend, start_proxy, cloud) -> None:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    middle, middle_url = fake_backend("middle", reply=BROKEN)
    strong, cloud_url = cloud
    proxy = start_proxy(_checked(tmp_path, [("coding", "openai/weak", weak_url), ("middle", "openai/middle", middle_url),
                                            ("claude", "openai/gpt-4o-mini", cloud_url)],
                                 {"coding": ["middle"]}, {"checks": ["code_parses"], "escalate_to": "claude"}))
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": ASK}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == GOOD
    assert r.headers["x-delegate-served-by"] == "openai/gpt-4o-mini"
    assert not middle.requests  # escalate_to goes straight to the better model
    row, = wait_rows(1)
    assert row["verdict"] == "passed" and row["escalations"] == 1 and row["backend"] == "openai"
    assert row["local_cost"] > 0.0  # the cloud's price for its tokens, from LiteLLM's table


def test_when_nothing_better_can_be_had_the_last_answer_comes_marked_failed(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    worse, worse_url = fake_backend("worse", reply=BROKEN)
    proxy = start_proxy(_checked(tmp_path, [("coding", "openai/weak", weak_url), ("worse", "openai/worse", worse_url)],
                                 {"coding": ["worse"]}, {"checks": ["code_parses"]}))
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": ASK}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == BROKEN
    assert r.headers["x-delegate-check"] == "failed" and r.headers["x-delegate-escalations"] == "1"
    row, = wait_rows(1)
    assert row["verdict"] == "failed" and row["saved"] == 0.0 and row["reference_cost"] > 0
    assert [c["passed"] for c in row["checks"]] == [False, False]


def test_a_chain_that_errors_after_a_failed_answer_still_answers(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    down, down_url = fake_backend("down", mode="unavailable")
    proxy = start_proxy(_checked(tmp_path, [("coding", "openai/weak", weak_url), ("down", "openai/down", down_url)],
                                 {"coding": ["down"]}, {"checks": ["code_parses"]}))
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": ASK}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == BROKEN
    assert r.headers["x-delegate-check"] == "failed"
    row, = wait_rows(1)
    assert row["status"] == "success" and row["verdict"] == "failed" and row["escalations"] == 1


def test_answers_that_pass_never_escalate(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    good, good_url = fake_backend("good", reply=GOOD)
    spare, spare_url = fake_backend("spare", reply=GOOD)
    proxy = start_proxy(_checked(tmp_path, [("coding", "openai/good", good_url), ("spare", "openai/spare", spare_url)],
                                 {"coding": ["spare"]}, {"checks": ["code_parses"]}))
    for stream in (False, True):
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": ASK, "stream": stream},
                       timeout=30)
        assert r.status_code == 200
    assert len(good.requests) == 2 and not spare.requests
    rows = wait_rows(2)
    assert [(r["verdict"], r["escalations"]) for r in rows] == [("passed", 0), ("passed", 0)]
    assert all(r["saved"] > 0 for r in rows)


def test_a_stream_is_checked_after_it_was_sent_unless_the_alias_holds_it(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    strong, strong_url = fake_backend("strong", reply=GOOD)
    deployments = [("coding", "openai/weak", weak_url), ("strong", "openai/strong", strong_url)]
    after = start_proxy(_checked(tmp_path, deployments, {"coding": ["strong"]}, {"checks": ["code_parses"]}))
    client = openai.OpenAI(base_url=after.url + "/v1", api_key="unused")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="coding", messages=ASK, stream=True) if c.choices)  # type: ignore[arg-type]
    assert text == BROKEN and not strong.requests  # already sent: recorded, not escalated
    row, = wait_rows(1)
    assert row["stream"] and row["verdict"] == "failed" and row["escalations"] == 0 and row["saved"] == 0.0

    (tmp_path / "hold").mkdir()
    held = start_proxy(_checked(tmp_path / "hold", deployments, {"coding": ["strong"]},
                                {"checks": ["code_parses"], "stream": "hold"}))
    client = openai.OpenAI(base_url=held.url + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="coding", messages=ASK, stream=True,  # type: ignore[arg-type]
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GOOD
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert strong.requests[-1].get("stream") in (None, False)  # asked whole, checked, then sent
    rows = wait_rows(2)
    assert rows[-1]["verdict"] == "passed" and rows[-1]["escalations"] == 1 and rows[-1]["stream"]


def test_unchecked_aliases_have_no_verdict(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    quiet, url = fake_backend("quiet", reply="")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "openai/quiet", url)], aliases=["quick"]))
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "quick", "messages": ASK}, timeout=30)
    assert r.status_code == 200 and "x-delegate-check" not in r.headers
    row, = wait_rows(1)
    assert row["verdict"] is None and row["checks"] == [] and row["saved"] > 0


# --- bad config stops start-up -------------------------------------------------------------------------

def _config(tmp_path: Path, checks: Any) -> Path:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["delegate"]["checks"] = checks
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(("checks", "message"), [
    ({"every_alias": ["not_emtpy"]}, "delegate.checks.every_alias[0]: unknown check 'not_emtpy'; the checks are "),
    ({"aliases": {"coding": {"checks": ["compiles"]}}}, "delegate.checks.aliases.coding.checks[0]: unknown check"),
    ({"aliases": {"coding": {"escalate_to": "gpt-9"}}},
     "delegate.checks.aliases.coding.escalate_to: no model_list entry has model_name 'gpt-9'"),
    ({"aliases": {"codnig": {"checks": ["not_empty"]}}}, "delegate.checks.aliases.codnig: 'codnig' is not one of"),
    ({"aliases": {"coding": {"stream": "later"}}}, "delegate.checks.aliases.coding.stream"),
])
def test_bad_checks_config_names_the_field(tmp_path: Path, checks: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings.load(_config(tmp_path, checks))
    assert message in str(e.value)


@pytest.mark.parametrize(("checks", "error"), [
    ({"aliases": {"coding": {"checks": ["code_parses"], "escalate_to": "claude"}}},
     "error: delegate.checks.aliases.coding.escalate_to: no model_list entry has model_name 'claude' (known: coding, "
     "quick, analysis, translation, creative, heavy, review, qwen2.5-coder:7b, deepseek-coder:6.7b, llama3.2:3b, "
     "llama3.1:8b, smollm2)"),
    ({"every_alias": ["not_empty", "compiles"]},
     "error: delegate.checks.every_alias[1]: unknown check 'compiles'; the checks are not_empty, not_repetitive, "
     "code_parses, json, review_findings"),
])
def test_serve_with_a_bad_check_or_escalation_exits_2(tmp_path: Path, checks: Any, error: str) -> None:
    result = subprocess.run([sys.executable, "-m", "proxy.client.cli", "serve", "--config", str(_config(tmp_path, checks)),
                             "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [error], result.stderr
    assert "Traceback" not in result.stderr


def test_the_shipped_config_checks_every_alias() -> None:
    checks = settings.load(ROOT / "config.yaml").answer_checks
    assert set(checks) == set(settings.load(ROOT / "config.yaml").aliases)
    assert checks["coding"].names == ("not_empty", "not_repetitive", "code_parses")
    assert json.dumps(checks["review"].names) == '["not_empty", "not_repetitive", "review_findings"]'


# --- the same through Anthropic's Messages API ---------------------------------------------------------

def _messages_proxy(tmp_path: Path, fake_backend, start_proxy, stream: str) -> tuple[Any, Any, Any]:  # type: ignore[no-untyped-def]
    weak, weak_url = fake_backend("weak", reply=BROKEN)
    strong, strong_url = fake_backend("strong", reply=GOOD)
    path = write_config(tmp_path / "c.yaml", [("coding", "openai/weak", weak_url), ("strong", "openai/strong", strong_url)],
                        fallbacks={"coding": ["strong"]}, aliases=["coding"],
                        delegate={"checks": {"aliases": {"coding": {"checks": ["code_parses"], "stream": stream}}},
                                  "anthropic": {"tiers": {"claude-haiku-*": "coding"}}})
    return start_proxy(path), weak, strong


def test_a_messages_api_answer_that_fails_escalates_too(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy, weak, strong = _messages_proxy(tmp_path, fake_backend, start_proxy, "after")
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-anything", max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=64, messages=ASK)  # type: ignore[arg-type]
    assert raw.parse().content[0].text == GOOD  # type: ignore[union-attr]
    assert raw.headers["x-delegate-check"] == "passed" and raw.headers["x-delegate-escalations"] == "1"
    # a stream is checked once it was sent: recorded, not escalated
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=ASK) as stream:  # type: ignore[arg-type]
        assert stream.get_final_text() == BROKEN
    rows = wait_rows(2)
    assert [(r["endpoint"], r["verdict"], r["escalations"]) for r in rows] == [("messages", "passed", 1),
                                                                              ("messages", "failed", 0)]


def test_a_held_messages_stream_is_checked_and_escalated_before_it_is_sent(tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                                                         start_proxy) -> None:
    proxy, weak, strong = _messages_proxy(tmp_path, fake_backend, start_proxy, "hold")
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-anything", max_retries=0)
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=ASK) as stream:  # type: ignore[arg-type]
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.content[0].text == GOOD and message.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert message.id.startswith("msg_") and message.usage.output_tokens > 0
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert len(weak.requests) == 1 and len(strong.requests) == 1
    row, = wait_rows(1)
    assert row["verdict"] == "passed" and row["escalations"] == 1 and row["stream"]


def test_auto_on_the_messages_api(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    backends = {a: fake_backend(a) for a in ("coding", "translation")}
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [(a, f"openai/{a}-model", url) for a, (_, url) in backends.items()],
                                     aliases=list(backends)))
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="sk-anything", max_retries=0)
    raw = claude.messages.with_raw_response.create(model="auto", max_tokens=16, system="You translate.", messages=[
        {"role": "user", "content": "Translate into Spanish: the shop opens at nine."}])
    assert raw.headers["x-delegate-alias"] == "translation"
    assert raw.parse().content[0].text == "answer from translation"  # type: ignore[union-attr]
    row, = wait_rows(1)
    assert (row["alias"], row["requested_model"]) == ("translation", "auto")
    # counting goes where auto would send it: a fake OpenAI-compatible server, which cannot count (not a 0)
    with pytest.raises(anthropic.NotFoundError, match="translation-model"):
        claude.messages.count_tokens(model="auto", messages=[
            {"role": "user", "content": "Translate into Spanish: the shop opens at nine."}])
