"""Which way a Messages API request goes: to a local alias, or through to Anthropic as it came.

`delegate.anthropic.tiers` in config.yaml maps Claude model names (shell globs, first match wins) to aliases;
by default the haiku tier (`claude-haiku-*`, `claude-3-5-haiku*`), where Claude Code sends its background
work and its Explore subagent, goes to `quick`. An alias or any model_name in model_list works as a model
too. Any other `claude...` model passes through to Anthropic verbatim (passthrough.py), unless
`delegate.anthropic.passthrough` is off.

A request that reached an alias through a tier remembers the Claude model it asked for: when the alias's
local chain cannot answer it (every local deployment down, or the request longer than any local context),
it goes to that model by passthrough, recorded as a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.settings import DEFAULT_TIERS, Settings


@dataclass(frozen=True)
class Local:
    """Served by `alias` through the Router; `claude` is the Claude model asked for, when a tier mapped it."""

    alias: str
    claude: str | None = None


@dataclass(frozen=True)
class Cloud:
    """Passed through to Anthropic as asked."""

    model: str


Route = Local | Cloud


def tiers(settings: Settings) -> dict[str, str]:
    """The tiers in force: those in config.yaml, or the default ones whose alias exists in this config."""
    configured = settings.delegate.anthropic.tiers
    if configured is not None:
        return dict(configured)
    return {glob: alias for glob, alias in DEFAULT_TIERS.items() if alias in settings.groups}


def is_claude(model: str) -> bool:
    return model.startswith("claude")


class ModelTiers:
    def __init__(self, settings: Settings) -> None:
        self.tiers = tiers(settings)
        self.groups = set(settings.groups)
        self.passthrough = settings.delegate.anthropic.passthrough

    def route(self, model: str) -> Route | None:
        """Where `model` goes; None when it is neither a model here nor a Claude model that may pass through."""
        if model in self.groups:
            return Local(model)
        for glob, alias in self.tiers.items():
            if fnmatchcase(model, glob):
                return Local(alias, model)
        if self.passthrough and is_claude(model):
            return Cloud(model)
        return None
