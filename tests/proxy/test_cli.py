"""The `delegate` command, run as users run it: a subprocess talking to a real proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.servers import ROOT, refused_port

FINDINGS = json.dumps({"findings": [
    {"severity": "high", "file": "calc.py", "line": 2, "message": "division by zero when b is 0", "suggestion": "check b"},
    {"severity": "low", "file": "calc.py", "line": 99, "message": "name is vague", "suggestion": "rename"}]})


def delegate(*args: str, url: str | None = None, stdin: str | None = None, cwd: Path = ROOT,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DELEGATE_URL": url or f"http://127.0.0.1:{refused_port()}"}
    return subprocess.run([sys.executable, "-m", "proxy.client.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit and a change on top of it."""
    path = tmp_path / "repo"
    path.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)

    git("init", "-q")
    (path / "calc.py").write_text("def div(a, b):\n    return 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (path / "calc.py").write_text("def div(a, b):\n    return a / b\n")
    return path


@pytest.fixture
def reviewer(tmp_path: Path, fake_backend, start_proxy) -> str:  # type: ignore[no-untyped-def]
    """A proxy whose `review` alias answers with two findings."""
    _, url = fake_backend("reviewer", reply=FINDINGS)
    return start_proxy(write_config(tmp_path / "c.yaml", [("review", "openai/reviewer", url)])).url


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys\nfrom proxy.client.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('litellm', 'openai', 'httpx', 'rich', 'tinygrad') if m in sys.modules]\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ask" in result.stdout and "review" in result.stdout


def test_ask_streams_the_real_model(real_proxy: str) -> None:
    r = delegate("ask", "What is the capital of France? Answer in one word.", "--task", "quick", "--max-tokens", "10",
                 "--temperature", "0", url=real_proxy)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_ask_json_reads_stdin(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    r = delegate("ask", "explain this diff", "--json", url=proxy.url, stdin="+ x = 1\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["success"] and out["text"] == "answer from ok" and out["model"] == "ok"
    assert backend.requests[-1]["messages"][-1]["content"] == "explain this diff\n\n+ x = 1\n"
    only_stdin = delegate("ask", "--json", url=proxy.url, stdin="just stdin")
    assert json.loads(only_stdin.stdout)["success"]


def test_ask_serves_any_alias_the_proxy_has_and_names_them_for_an_unknown_one(tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                                                               start_proxy) -> None:
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("summarize", "openai/ok", url), ("coding", "openai/ok", url)],
                                     aliases=["summarize", "coding"]))
    streamed = delegate("ask", "hi", "--task", "summarize", url=proxy.url)
    assert streamed.returncode == 0 and streamed.stdout == "answer from ok\n", streamed.stderr
    assert json.loads(delegate("ask", "hi", "--task", "summarize", "--json", url=proxy.url).stdout)["success"]
    for extra in ([], ["--json"]):
        unknown = delegate("ask", "hi", "--task", "poetry", *extra, url=proxy.url)
        assert unknown.returncode == 1
        assert unknown.stderr == "error: unknown task 'poetry'; the proxy's aliases are summarize, coding\n"


def test_ask_and_review_name_their_source(repo: Path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("review", reply=FINDINGS)  # straight to an OpenAI-compatible server: no aliases listed
    for args in (["ask", "hi", "--task", "review"], ["ask", "hi", "--task", "review", "--json"]):
        assert delegate(*args, url=url).returncode == 0
        assert backend.headers[-1]["x-delegate-source"] == "cli"
    assert delegate("review", url=url, cwd=repo).returncode == 0
    assert backend.headers[-1]["x-delegate-source"] == "review"


def test_models_and_status(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    models = delegate("models", "--json", url=proxy.url)
    assert [m["id"] for m in json.loads(models.stdout)] == ["coding"]
    table = delegate("models", url=proxy.url)
    assert table.returncode == 0 and "coding" in table.stdout
    status = json.loads(delegate("status", "--json", url=proxy.url).stdout)
    assert status["ready"] and status["deployments"][0]["status"] == "ready" and "rows" in status["store"]


@pytest.mark.parametrize("command", [["ask", "hi"], ["models"], ["status"], ["ask", "hi", "--json"]])
def test_unreachable_proxy_is_one_line_and_nonzero(command: list[str]) -> None:
    r = delegate(*command)
    assert r.returncode != 0
    if "--json" in command:
        assert "cannot reach the Delegate proxy" in json.loads(r.stdout)["error"]
    elif command[0] == "status":
        assert "down" in r.stdout
    else:
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot reach the Delegate proxy")


def test_review_working_tree_markdown(repo: Path, reviewer: str) -> None:
    r = delegate("review", url=reviewer, cwd=repo)
    assert r.returncode == 0, r.stderr
    assert "**high** `calc.py:2`: division by zero when b is 0" in r.stdout
    assert "**low** `calc.py:2` (the model said line 99): name is vague" in r.stdout  # pinned to a real line


def test_review_piped_diff_sarif_and_fail_on(repo: Path, reviewer: str) -> None:
    diff = subprocess.run(["git", "diff"], cwd=repo, capture_output=True, text=True).stdout
    r = delegate("review", "--format", "sarif", "--fail-on", "high", url=reviewer, stdin=diff, cwd=repo)
    assert r.returncode == 1  # a high finding
    sarif = json.loads(r.stdout)
    assert sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"] == 2
    assert delegate("review", "--json", "--fail-on", "high", url=reviewer, stdin=diff).returncode == 1
    low_ok = delegate("review", "--json", url=reviewer, stdin=diff)
    assert low_ok.returncode == 0 and len(json.loads(low_ok.stdout)["findings"]) == 2


def test_review_base_ref(repo: Path, reviewer: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second"], cwd=repo, check=True)
    r = delegate("review", "--base", "HEAD~1", "--json", url=reviewer, cwd=repo)
    assert r.returncode == 0 and json.loads(r.stdout)["findings"][0]["file"] == "calc.py"


def test_review_clear_messages(repo: Path, tmp_path: Path, reviewer: str) -> None:
    subprocess.run(["git", "checkout", "-q", "calc.py"], cwd=repo, check=True)
    empty = delegate("review", url=reviewer, cwd=repo)
    assert empty.returncode == 0 and empty.stderr.strip() == "nothing to review: the diff is empty"
    binary = "diff --git a/logo.png b/logo.png\nindex 1..2 100644\nBinary files a/logo.png and b/logo.png differ\n"
    b = delegate("review", url=reviewer, stdin=binary)
    assert b.returncode == 0 and b.stderr.strip() == "nothing to review: logo.png (binary)"
    outside = tmp_path / "plain"
    outside.mkdir()
    not_git = delegate("review", "--working-tree", url=reviewer, cwd=outside)
    assert not_git.returncode == 2 and "is not a git repository" in not_git.stderr and not_git.stderr.count("\n") == 1
    down = delegate("review", cwd=repo, stdin="diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n+x\n")
    assert down.returncode == 2 and "cannot reach the Delegate proxy" in down.stderr and down.stderr.count("\n") == 1


def test_review_asks_for_the_findings_schema_through_the_proxy(repo: Path, tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                                                start_proxy) -> None:
    from proxy.review.findings import RESPONSE_FORMAT

    backend, url = fake_backend("reviewer", reply=FINDINGS)
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("review", "openai/reviewer", url)]))
    r = delegate("review", "--json", "--max-tokens", "100000", url=proxy.url, cwd=repo)
    assert r.returncode == 0 and len(json.loads(r.stdout)["findings"]) == 2
    sent = backend.requests[-1]
    assert sent["response_format"] == RESPONSE_FORMAT and RESPONSE_FORMAT["json_schema"]["strict"] is True
    import httpx

    served = httpx.get(proxy.url + "/v1/models").json()["data"][0]["context_length"] or 2048
    assert sent["stream"] is True and sent["max_tokens"] == served // 2  # the diff keeps the other half


def test_review_stops_a_reply_that_repeats_itself(repo: Path, tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    finding = '{"severity":"high","file":"calc.py","line":2,"message":"division by zero","suggestion":"check b"}'
    backend, url = fake_backend("looper", reply='{"findings":[' + ",".join([finding] * 30))
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("review", "openai/looper", url)]))
    r = delegate("review", "--json", url=proxy.url, cwd=repo)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["message"] for f in out["findings"]] == ["division by zero"]  # kept once
    assert "repeating itself" in out["notes"][0]["text"]
    assert len(backend.requests) == 1  # a loop is not asked again


def test_review_with_the_real_model_never_crashes(repo: Path, real_proxy: str) -> None:
    """Whatever the bundled model writes (JSON or not), the review completes with findings or notes."""
    r = delegate("review", "--max-tokens", "24", url=real_proxy, cwd=repo)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# Code review")
    assert "findings" in r.stdout


def test_keys_create_list_revoke(delegate_home: Path) -> None:
    env_home = {"DELEGATE_HOME": str(delegate_home)}

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.client.cli", "keys", *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env_home}, timeout=60)

    created = json.loads(keys("create", "--aliases", "coding,quick", "--budget", "5.00", "--rpm", "60", "--json").stdout)
    assert created["key"].startswith("sk-dlg-") and created["aliases"] == ["coding", "quick"]
    assert (created["budget_usd"], created["rpm"], created["active"]) == (5.0, 60, True)
    assert [k["key_id"] for k in json.loads(keys("list", "--json").stdout)] == [created["key_id"]]
    assert keys("revoke", created["key_id"]).returncode == 0
    assert json.loads(keys("list", "--json").stdout)[0]["active"] is False
    again = keys("revoke", created["key_id"])
    assert again.returncode == 1 and again.stderr.startswith("error:")
    bad = keys("create", "--aliases", "coding,poetry")
    assert bad.returncode == 1 and "unknown alias poetry" in bad.stderr


@pytest.mark.parametrize(("args", "refused"), [
    (["list", "--budget", "5"], "unrecognized arguments: --budget 5"),  # each action takes only its own options
    (["revoke", "--name", "x", "key_1"], "unrecognized arguments: --name"),
    (["create", "key_1"], "unrecognized arguments: key_1"),
    (["revoke"], "the following arguments are required: key_id"),
    ([], "the following arguments are required: ACTION"),
])
def test_keys_actions_take_only_their_own_options(args: list[str], refused: str) -> None:
    r = delegate("keys", *args)
    assert r.returncode == 2 and refused in r.stderr


def test_keys_help_lists_the_actions() -> None:
    out = delegate("keys", "--help").stdout
    assert all(action in out for action in ("create", "list", "revoke"))
    create = delegate("keys", "create", "--help").stdout
    assert "--budget" in create and "--expires-days" in create
    assert "--budget" not in delegate("keys", "list", "--help").stdout
