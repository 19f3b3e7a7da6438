"""config.yaml: the shipped file is valid, and each kind of mistake stops start-up naming the field."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import settings
from proxy.settings import ConfigError
from tests.conftest import write_config
from tests.servers import ROOT, free_port

ALIASES = ["coding", "quick", "analysis", "translation", "creative", "heavy", "review"]


def test_shipped_config_has_the_seven_aliases_ending_in_the_bundled_model() -> None:
    s = settings.load(ROOT / "config.yaml")
    assert s.aliases == ALIASES
    for alias in ALIASES:
        chain = s.chain(alias)
        assert chain[-1] == "smollm2", alias
        assert s.deployments(chain[-1])[0]["litellm_params"]["model"] == "tinygrad/smollm2"
    assert s.chain("coding") == ["coding", "deepseek-coder:6.7b", "llama3.2:3b", "smollm2"]
    assert s.deployments("coding")[0]["litellm_params"]["model"] == "ollama_chat/qwen2.5-coder:7b"


def test_shipped_config_builds_a_router() -> None:
    from proxy.routing.router import build_router

    router, deployments = build_router(settings.load(ROOT / "config.yaml"))
    assert len(deployments) == 12
    assert {d.provider for d in deployments.values()} == {"ollama_chat", "tinygrad"}


def test_local_deployments_are_free_to_litellm_and_cloud_ones_keep_its_prices(tmp_path: Path) -> None:
    """LiteLLM is told a local deployment costs nothing (we price its electricity): explicit zero rates, not
    unknown ones, so it neither guesses a price nor diagnoses a missing one on every call. A rate the config
    sets is kept; a cloud deployment keeps LiteLLM's table."""
    from proxy.routing.router import build_router

    path = write_config(tmp_path / "config.yaml", [
        ("local", "openai/fast", "http://127.0.0.1:9/v1"),
        ("priced", "openai/fast", "http://localhost:9/v1"),
        ("cloud", "anthropic/claude-sonnet-4-5", None, {"api_key": "sk-test"}),
    ], aliases=["local"])
    raw = yaml.safe_load(path.read_text())
    raw["model_list"][1]["model_info"]["output_cost_per_token"] = 1e-6
    path.write_text(yaml.safe_dump(raw))
    router, deployments = build_router(settings.load(path))
    info = {d["model_info"]["id"]: d["model_info"] for d in router.get_model_list()}
    assert [d.is_local for d in deployments.values()] == [True, True, False]
    assert (info["local#0"]["input_cost_per_token"], info["local#0"]["output_cost_per_token"]) == (0.0, 0.0)
    assert (info["priced#1"]["input_cost_per_token"], info["priced#1"]["output_cost_per_token"]) == (0.0, 1e-6)
    assert "input_cost_per_token" not in info["cloud#2"] and "output_cost_per_token" not in info["cloud#2"]


def _mutate(tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    change(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("change", "field"), [
    (lambda c: c.update(modle_list=[]), "modle_list: unknown key"),
    (lambda c: c["router_settings"]["fallbacks"].append({"coding": ["gpt-7"]}), "falls back to 'gpt-7'"),
    (lambda c: c["router_settings"]["fallbacks"].append({"nope": ["smollm2"]}), "'nope' is not a model_name"),
    (lambda c: c["model_list"][0]["litellm_params"].update(api_key="os.environ/DELEGATE_TEST_UNSET_KEY"),
     "model_list[0].litellm_params.api_key: environment variable DELEGATE_TEST_UNSET_KEY is not set"),
    (lambda c: c["delegate"].update(refrence_model="x"), "delegate.refrence_model"),
    (lambda c: c["delegate"]["aliases"].update(missing="x"), "delegate.aliases.missing"),
    (lambda c: c["model_list"][1].update(litellm_parms={}), "model_list[1].litellm_parms: unknown key"),
    (lambda c: c["model_list"][2]["litellm_params"].pop("model"), "model_list[2].litellm_params.model"),
])
def test_broken_config_names_the_field(tmp_path: Path, change, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as e:
        settings.load(_mutate(tmp_path, change))
    assert field in str(e.value)


@pytest.mark.parametrize(("change", "field"), [
    (lambda c: c["router_settings"].update(num_retrys=3), "router_settings.num_retrys: unknown key"),
    (lambda c: c["litellm_settings"].update(drop_param=True), "litellm_settings.drop_param"),
    (lambda c: c["model_list"][0]["litellm_params"].update(api_bse="x"), "model_list[0].litellm_params.api_bse"),
])
def test_keys_are_checked_against_litellm(tmp_path: Path, change, field: str) -> None:  # type: ignore[no-untyped-def]
    s = settings.load(_mutate(tmp_path, change))
    with pytest.raises(ConfigError) as e:
        settings.check_against_litellm(s)
    assert field in str(e.value)


def test_env_references_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELEGATE_TEST_OLLAMA", "http://10.0.0.5:11434")
    s = settings.load(_mutate(tmp_path, lambda c: c["model_list"][0]["litellm_params"].update(
        api_base="os.environ/DELEGATE_TEST_OLLAMA")))
    assert s.model_list[0]["litellm_params"]["api_base"] == "http://10.0.0.5:11434"


def test_yaml_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model_list:\n  - model_name: a\n   litellm_params: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        settings.load(path)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("kind", ["yaml", "fallback", "env"])
def test_serve_with_broken_config_exits_2_and_starts_nothing(tmp_path: Path, kind: str) -> None:
    if kind == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text("model_list: [\n")
    elif kind == "fallback":
        path = write_config(tmp_path / "c.yaml", [("a", "openai/x", "http://127.0.0.1:1/v1")], fallbacks={"a": ["b"]})
    else:
        path = _mutate(tmp_path, lambda c: c["model_list"][0]["litellm_params"].update(api_key="os.environ/NOPE_NOT_SET"))
    port, backend_port = free_port(), free_port()
    raw = yaml.safe_load(path.read_text()) if kind != "yaml" else None
    if raw and raw.get("delegate", {}).get("backend") is not None:
        raw["delegate"]["backend"]["port"] = backend_port
        path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "proxy.client.cli", "serve", "--config", str(path), "--port", str(port)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not _listening(port) and not _listening(backend_port)


def test_serve_refuses_a_public_address_without_a_master_key(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "proxy.client.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DELEGATE_MASTER_KEY" in result.stderr


def test_serve_freezes_what_start_up_loaded() -> None:
    """`delegate serve` calls tune_collector before serving (why: its docstring): LiteLLM's price table is
    frozen out of the collector's reach, and young objects are collected less often."""
    code = ("import gc, litellm; from proxy.server.serve import tune_collector; before = gc.get_freeze_count(); "
            "tune_collector(); print(before, gc.get_freeze_count(), gc.get_threshold()[0])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    before, frozen, threshold = map(int, result.stdout.split())
    assert before == 0 and frozen > 100_000 and threshold == 10_000
    assert "tune_collector()" in (ROOT / "proxy" / "server" / "serve.py").read_text().split("def serve(", 1)[1]
