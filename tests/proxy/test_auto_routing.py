"""`model="auto"`: the alias chosen from the request, on the held-out labelled set and through a real proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from proxy import settings
from proxy.routing.auto import AutoRouter, labels
from proxy.settings import ConfigError
from proxy.usage.keys import KeyStore
from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.servers import ROOT, free_port

DATA = ROOT / "bench" / "routing"
AUTO_ALIASES = ["coding", "quick", "analysis", "translation", "creative", "review"]
DIFF = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n-a = 1\n+a = 2\n"


def _rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _messages(row: dict[str, str]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]}]


def test_the_held_out_set_is_apart_from_the_training_set_and_covers_every_alias() -> None:
    train, held_out = _rows("train.jsonl"), _rows("eval.jsonl")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert sorted({r["alias"] for r in held_out}) == sorted(AUTO_ALIASES) == sorted(labels())
    assert len(train) + len(held_out) >= 400


def test_auto_is_right_on_at_least_90_percent_of_prompts_it_was_not_trained_on() -> None:
    """A model-quality check, not a timing one: bench-routing reports the same figure with its confusion matrix."""
    router = AutoRouter(AUTO_ALIASES)
    rows = _rows("eval.jsonl")
    wrong = [(r["alias"], got, r["prompt"][:60]) for r in rows if (got := router.choose(_messages(r))) != r["alias"]]
    assert 1 - len(wrong) / len(rows) >= 0.9, wrong


def test_a_diff_is_a_review_and_only_allowed_aliases_are_chosen() -> None:
    router = AutoRouter(AUTO_ALIASES)
    assert router.choose([{"role": "user", "content": "what do you think?\n" + DIFF}]) == "review"
    assert router.choose("Translate to German: good night") == "translation"
    assert router.choose([{"role": "user", "content": [{"type": "text", "text": "Write a haiku about snow."}]}]) == "creative"
    # only the last user message counts, with the system prompt as a hint
    history = [{"role": "system", "content": "You are a translator."}, {"role": "user", "content": "write a poem"},
               {"role": "assistant", "content": "..."}, {"role": "user", "content": "Traduis en anglais : bonne nuit"}]
    assert router.choose(history) == "translation"
    assert router.choose(DIFF, allowed=["coding", "quick"]) in ("coding", "quick")
    assert router.choose(DIFF, allowed=["heavy"]) is None
    assert AutoRouter(["coding"]).choose("translate this to French: hello") == "coding"


def test_a_long_paste_is_decided_from_its_head_and_tail() -> None:
    router = AutoRouter(AUTO_ALIASES)
    paste = "Summarize this article in three bullet points:\n" + "The council met and voted on the budget. " * 20_000
    start = time.perf_counter()
    assert router.choose(paste) == "analysis"
    assert time.perf_counter() - start < 0.5  # generous: a loaded CI machine; bench-routing measures the real figure


@pytest.fixture
def auto_proxy(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    backends = {alias: fake_backend(alias) for alias in ("coding", "translation", "review", "quick")}
    config = write_config(tmp_path / "c.yaml", [(a, f"openai/{a}-model", url) for a, (_, url) in backends.items()],
                          aliases=list(backends))
    return start_proxy(config), {a: b for a, (b, _) in backends.items()}


def _wait_rows(n: int) -> list[dict]:
    deadline = time.monotonic() + 20
    while len(rows := UsageStore.open().rows()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


def test_auto_through_the_proxy_lands_on_the_chosen_alias_and_says_so(auto_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy, backends = auto_proxy
    r = httpx.post(proxy.url + "/v1/chat/completions", timeout=30, json={
        "model": "auto", "messages": [{"role": "user", "content": "Translate into Spanish: the shop opens at nine."}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-delegate-alias"] == "translation"
    assert r.json()["choices"][0]["message"]["content"] == "answer from translation"
    assert len(backends["translation"].requests) == 1 and not backends["coding"].requests
    text = httpx.post(proxy.url + "/v1/completions", timeout=30, json={"model": "auto", "prompt": "Please review:\n" + DIFF})
    assert text.status_code == 200 and text.headers["x-delegate-alias"] == "review"
    rows = {row["request_id"]: row for row in _wait_rows(2)}
    assert rows[r.headers["x-request-id"]]["alias"] == "translation"
    assert rows[text.headers["x-request-id"]]["alias"] == "review"

    listed = {m["id"]: m for m in httpx.get(proxy.url + "/v1/models", timeout=30).json()["data"]}
    # the config's aliases the classifier knows (this config has no analysis, translation... beyond these four)
    assert listed["auto"]["kind"] == "auto" and listed["auto"]["aliases"] == ["coding", "translation", "review", "quick"]


def test_auto_picks_only_among_a_keys_aliases(auto_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy, backends = auto_proxy
    keys = KeyStore(UsageStore.open())
    quick_only, _ = keys.create(aliases=["quick"])
    nothing_auto_knows, _ = keys.create(aliases=["heavy"])
    body = {"model": "auto", "messages": [{"role": "user", "content": "Translate into Spanish: good morning"}]}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {quick_only}"},
                   timeout=30)
    assert r.status_code == 200 and r.headers["x-delegate-alias"] == "quick"
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body,
                   headers={"authorization": f"Bearer {nothing_auto_knows}"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "alias_not_allowed"
    assert not backends["translation"].requests


def _config(tmp_path: Path, auto: object, extra_model: str | None = None) -> Path:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["delegate"]["auto"] = auto
    if extra_model:
        raw["model_list"].append({"model_name": extra_model, "litellm_params": {"model": "openai/x"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_auto_config_defaults_and_off(tmp_path: Path) -> None:
    assert settings.load(_config(tmp_path, {})).delegate.auto.aliases == AUTO_ALIASES  # every alias but heavy
    assert settings.load(_config(tmp_path, {"aliases": ["coding", "review"]})).delegate.auto.aliases == ["coding", "review"]
    assert settings.load(_config(tmp_path, {"aliases": []})).delegate.auto.aliases == []
    assert settings.load(_config(tmp_path, {}, extra_model="auto")).delegate.auto.aliases == []  # a model named auto wins


@pytest.mark.parametrize(("auto", "extra", "message"), [
    ({"aliases": ["coding", "codnig"]}, None, "delegate.auto.aliases[1]: 'codnig' is not one of delegate.aliases"),
    ({"aliases": ["heavy"]}, None, "delegate.auto.aliases[0]: the auto classifier cannot choose 'heavy'"),
    ({"alias": ["coding"]}, None, "delegate.auto.alias"),
    ({"aliases": ["coding"]}, "auto", "delegate.auto: 'auto' is a model_name in model_list"),
])
def test_bad_auto_config_names_the_field(tmp_path: Path, auto: object, extra: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings.load(_config(tmp_path, auto, extra))
    assert message in str(e.value)


def test_serve_with_a_bad_auto_alias_exits_2(tmp_path: Path) -> None:
    path = _config(tmp_path, {"aliases": ["coding", "nope"]})
    result = subprocess.run([sys.executable, "-m", "proxy.client.cli", "serve", "--config", str(path), "--port",
                             str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: delegate.auto.aliases[1]: 'nope' is not one of delegate.aliases "
        "(coding, quick, analysis, translation, creative, heavy, review)"], result.stderr
    assert "Traceback" not in result.stderr
