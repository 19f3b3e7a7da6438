"""config.yaml: read it, resolve `os.environ/NAME` references, and refuse anything broken.

The file is LiteLLM's proxy format (`model_list`, `router_settings`, `litellm_settings`) plus a
`delegate:` section for our own settings. Every mistake stops start-up with one message that names the
field (`model_list[2].litellm_params.api_key: environment variable ANTHROPIC_API_KEY is not set`), before
any process or port is touched. Keys are checked against LiteLLM's own signatures, so a typo in
`router_settings` is caught instead of silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.routing.answer_checks import CHECKS, AliasChecks

ENV_PREFIX = "os.environ/"
TOP_LEVEL = ("model_list", "router_settings", "litellm_settings", "delegate")
FALLBACK_KEYS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")
DEPLOYMENT_KEYS = ("model_name", "litellm_params", "model_info")
# model_info keys of our own, or ones LiteLLM reads that its ModelInfo type does not declare
EXTRA_MODEL_INFO = ("power_watts", "max_tokens", "max_input_tokens", "max_output_tokens", "mode", "description")
EXTRA_LITELLM_PARAMS = ("keep_alive", "num_ctx", "extra_body")


class ConfigError(Exception):
    """config.yaml is broken; the message names the field."""


class BackendSettings(BaseModel):
    """The local tinygrad_backend that `delegate serve` starts before the proxy."""

    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    max_context: int = Field(2048, ge=16)
    parallel: int = Field(4, ge=1, le=64)  # generations decoded together, each with a KV cache of max_context
    device: str | None = None
    weights: str = Field("auto", pattern="^(auto|packed|quantized|fp16|fp32)$")
    beam: int = Field(0, ge=0)  # kernel search: slow first start, faster decoding (see tinygrad_backend --help)
    start_timeout_s: float = Field(600, gt=0)


# Claude Code sends its background work (titles, topic detection) and its Explore subagent to the haiku tier
DEFAULT_TIERS = {"claude-haiku-*": "quick", "claude-3-5-haiku*": "quick"}


class AnthropicSettings(BaseModel):
    """Anthropic's Messages API (/v1/messages): the Claude models local aliases answer, and the way to Anthropic
    for the rest (proxy/server/model_tiers.py, passthrough.py)."""

    model_config = ConfigDict(extra="forbid")
    # Claude model name (a shell glob, first match wins) -> alias; unset: DEFAULT_TIERS, where the alias exists
    tiers: dict[str, str] | None = None
    passthrough: bool = True  # a Claude model no tier maps goes to Anthropic as it came; off: 404
    base_url: str = Field("https://api.anthropic.com", pattern=r"^https?://")
    api_key: str | None = None  # for callers who send no Anthropic key of their own: os.environ/ANTHROPIC_API_KEY
    timeout_s: float = Field(600, gt=0)


class AutoSettings(BaseModel):
    """`model="auto"` (proxy/routing/auto.py): the aliases it may choose; unset: every alias its classifier knows
    except heavy (when that is two or more); empty: auto is off."""

    model_config = ConfigDict(extra="forbid")
    aliases: list[str] | None = None


class AliasCheckSettings(BaseModel):
    """One alias's answer checks (proxy/routing/answer_checks.py), beyond those every alias has."""

    model_config = ConfigDict(extra="forbid")
    checks: list[str] = Field(default_factory=list)
    escalate_to: str | None = None  # a model_name; unset: an answer that fails goes on down the alias's chain
    stream: Literal["after", "hold"] = "after"  # hold: a stream is sent only once its answer passed


class ChecksSettings(BaseModel):
    """Answers checked before they count as delegated work; one that fails escalates."""

    model_config = ConfigDict(extra="forbid")
    every_alias: list[str] = Field(default_factory=list)
    aliases: dict[str, AliasCheckSettings] = Field(default_factory=dict)


class DelegateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aliases: dict[str, str] = Field(min_length=1)  # task alias -> what it is for
    reference_model: str = "claude-sonnet-4-5"  # what the work would have cost in the cloud
    electricity_usd_per_kwh: float = Field(0.30, ge=0)
    default_power_watts: float = Field(0.0, ge=0)  # for a local deployment without model_info.power_watts
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(600, gt=0)  # whole request, fallbacks included
    header_timeout_s: float = Field(10, gt=0)  # a connection whose request headers take longer is closed
    backend: BackendSettings | None = Field(default_factory=lambda: BackendSettings())
    anthropic: AnthropicSettings = Field(default_factory=lambda: AnthropicSettings())
    auto: AutoSettings = Field(default_factory=lambda: AutoSettings())
    checks: ChecksSettings = Field(default_factory=lambda: ChecksSettings())


@dataclass
class Settings:
    path: Path
    model_list: list[dict[str, Any]]
    router_settings: dict[str, Any]
    litellm_settings: dict[str, Any]
    delegate: DelegateSettings
    groups: list[str] = field(default_factory=list)  # every model_name, in file order

    @property
    def aliases(self) -> list[str]:
        return list(self.delegate.aliases)

    @cached_property
    def answer_checks(self) -> dict[str, AliasChecks]:
        """Each alias's checks: those of every alias, then its own (none: the alias is not checked)."""
        found = {}
        for alias in self.delegate.aliases:
            own = self.delegate.checks.aliases.get(alias) or AliasCheckSettings()
            names = tuple(dict.fromkeys([*self.delegate.checks.every_alias, *own.checks]))
            if names:
                found[alias] = AliasChecks(names, own.escalate_to, own.stream == "hold")
        return found

    def deployments(self, group: str) -> list[dict[str, Any]]:
        return [d for d in self.model_list if d["model_name"] == group]

    def chain(self, alias: str) -> list[str]:
        """The model groups tried for `alias`, in order: itself, then its fallbacks."""
        for entry in self.router_settings.get("fallbacks") or []:
            if alias in entry:
                return [alias, *entry[alias]]
        return [alias]


def resolve_env(value: Any, where: str) -> Any:
    """Replace every `os.environ/NAME` string inside `value`; a missing variable is a ConfigError."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return os.environ[name]
    if isinstance(value, dict):
        return {k: resolve_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load(path: str | Path) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(TOP_LEVEL)}")
    # top-level `x-...` keys only hold YAML anchors for the rest of the file, as in docker-compose
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    _no_unknown(raw, TOP_LEVEL, "")
    raw = resolve_env(raw, path.name)

    model_list = _model_list(raw.get("model_list"))
    groups = list(dict.fromkeys(d["model_name"] for d in model_list))
    router_settings = _mapping(raw, "router_settings")
    litellm_settings = _mapping(raw, "litellm_settings")
    try:
        delegate = DelegateSettings.model_validate(raw.get("delegate") or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"delegate.{where}: {first['msg']}" if where else f"delegate: {first['msg']}") from e

    for alias in delegate.aliases:
        if alias not in groups:
            raise ConfigError(f"delegate.aliases.{alias}: no model_list entry has model_name {alias!r}")
    for glob, alias in (delegate.anthropic.tiers or {}).items():
        if alias not in groups:
            raise ConfigError(f"delegate.anthropic.tiers.{glob}: no model_list entry has model_name {alias!r}")
    _check_fallbacks(router_settings, groups)
    _check_checks(delegate.checks, delegate, groups)
    delegate.auto.aliases = _auto_aliases(delegate, groups)
    return Settings(path, model_list, router_settings, litellm_settings, delegate, groups)


def check_against_litellm(settings: Settings) -> None:
    """The checks that need LiteLLM itself (imported by the caller, who is about to serve)."""
    import litellm
    from litellm.types.router import LiteLLM_Params, ModelInfo

    router_keys = set(inspect.signature(litellm.Router).parameters) - {"model_list"}
    _no_unknown(settings.router_settings, router_keys, "router_settings.")
    for key in settings.litellm_settings:
        if not hasattr(litellm, key):
            raise ConfigError(f"litellm_settings.{key}: not a LiteLLM setting")
    params = set(LiteLLM_Params.model_fields) | set(inspect.signature(litellm.completion).parameters) | set(EXTRA_LITELLM_PARAMS)
    info = set(ModelInfo.model_fields) | set(EXTRA_MODEL_INFO)
    for i, d in enumerate(settings.model_list):
        _no_unknown(d["litellm_params"], params, f"model_list[{i}].litellm_params.")
        _no_unknown(d.get("model_info") or {}, info, f"model_list[{i}].model_info.")


def import_object(dotted: str, where: str) -> Any:
    """`package.module.attribute` -> the attribute (for callbacks and custom handlers)."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot import {dotted!r}: {e}") from e


def _no_unknown(mapping: dict[str, Any], known: Any, prefix: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping")
    return value


def _model_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ConfigError("model_list: expected a non-empty list of deployments")
    for i, d in enumerate(value):
        where = f"model_list[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping with model_name and litellm_params")
        _no_unknown(d, DEPLOYMENT_KEYS, f"{where}.")
        if not isinstance(d.get("model_name"), str) or not d["model_name"]:
            raise ConfigError(f"{where}.model_name: required, a non-empty string")
        params = d.get("litellm_params")
        if not isinstance(params, dict) or not isinstance(params.get("model"), str) or "/" not in params["model"]:
            raise ConfigError(f"{where}.litellm_params.model: required, as provider/model (e.g. ollama_chat/llama3.2:3b)")
        if not isinstance(d.get("model_info") or {}, dict):
            raise ConfigError(f"{where}.model_info: expected a mapping")
    return value


def _check_fallbacks(router_settings: dict[str, Any], groups: list[str]) -> None:
    for key in FALLBACK_KEYS:
        entries = router_settings.get(key) or []
        if not isinstance(entries, list):
            raise ConfigError(f"router_settings.{key}: expected a list of {{group: [groups]}}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"router_settings.{key}[{i}]: expected one {{group: [fallback groups]}}")
            (source, targets), = entry.items()
            if source not in groups:
                raise ConfigError(f"router_settings.{key}[{i}]: {source!r} is not a model_name in model_list")
            if not isinstance(targets, list) or not targets:
                raise ConfigError(f"router_settings.{key}[{i}].{source}: expected a list of model names")
            for target in targets:
                if target not in groups:
                    raise ConfigError(
                        f"router_settings.{key}[{i}].{source}: falls back to {target!r}, which is not a model_name "
                        f"in model_list (known: {', '.join(groups)})"
                    )


def _check_checks(checks: ChecksSettings, delegate: DelegateSettings, groups: list[str]) -> None:
    def known(names: list[str], where: str) -> None:
        for i, name in enumerate(names):
            if name not in CHECKS:
                raise ConfigError(f"{where}[{i}]: unknown check {name!r}; the checks are {', '.join(CHECKS)}")

    known(checks.every_alias, "delegate.checks.every_alias")
    for alias, own in checks.aliases.items():
        where = f"delegate.checks.aliases.{alias}"
        if alias not in delegate.aliases:
            raise ConfigError(f"{where}: {alias!r} is not one of delegate.aliases ({', '.join(delegate.aliases)})")
        known(own.checks, f"{where}.checks")
        if own.escalate_to is not None and own.escalate_to not in groups:
            raise ConfigError(f"{where}.escalate_to: no model_list entry has model_name {own.escalate_to!r} "
                              f"(known: {', '.join(groups)})")
        if own.escalate_to == alias:
            raise ConfigError(f"{where}.escalate_to: an alias cannot escalate to itself")


def _auto_aliases(delegate: DelegateSettings, groups: list[str]) -> list[str]:
    """The aliases `model="auto"` chooses among: each one an alias here that the shipped classifier knows."""
    from proxy.routing.auto import AUTO, labels  # the standard library and one JSON file

    chosen = delegate.auto.aliases
    if chosen is None:  # by default, on where it has a choice to make
        found = [a for a in delegate.aliases if a in labels() and a != "heavy"]
        return found if len(found) >= 2 and AUTO not in groups else []
    if chosen and AUTO in groups:
        raise ConfigError(f"delegate.auto: {AUTO!r} is a model_name in model_list; rename it, or set "
                          "delegate.auto.aliases to [] to turn auto off")
    for i, alias in enumerate(chosen):
        if alias not in delegate.aliases:
            raise ConfigError(f"delegate.auto.aliases[{i}]: {alias!r} is not one of delegate.aliases "
                              f"({', '.join(delegate.aliases)})")
        if alias not in labels():
            raise ConfigError(f"delegate.auto.aliases[{i}]: the auto classifier cannot choose {alias!r}; it knows "
                              f"{', '.join(labels())} (bench/train_router.py trains it)")
    return list(dict.fromkeys(chosen))
