"""The one place a `litellm.Router` is built from config.yaml, and what we ask of it afterwards.

Scaling out (Redis-shared cooldowns, several deployments per alias) is a matter of router_settings:
nothing here changes. Every deployment gets a stable id from its position in model_list, so replicas
reading the same file agree on ids (cooldowns shared through Redis are keyed by them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import litellm

from proxy.settings import ConfigError, Settings, check_against_litellm, import_object

log = logging.getLogger("delegate")


@dataclass(frozen=True)
class Deployment:
    id: str
    group: str
    model: str  # provider/model, as in litellm_params.model
    api_base: str | None
    power_watts: float | None

    @property
    def provider(self) -> str:
        return self.model.split("/", 1)[0]

    @property
    def is_local(self) -> bool:
        return self.provider in ("tinygrad", "ollama", "ollama_chat") or (
            self.api_base is not None and any(h in self.api_base for h in ("127.0.0.1", "localhost", "[::1]")))


# A local deployment's provider charges nothing (its electricity is priced in pricing.py), and saying so
# to LiteLLM matters: a response it prices at $0 without explicit zero rates sends every call through its
# zero-cost diagnostic, which walks the model's whole price entry twice a request (~1.5 ms of 7 here).
FREE = ("input_cost_per_token", "output_cost_per_token")


def deployment_id(index: int, group: str) -> str:
    return f"{group}#{index}"


# Ours, always registered by the code that builds the Router: the usage callback (whose attempt trace decides
# the proxy's 502/503/429 answers and writes every row) and the tinygrad provider. Configs written before
# this named them in litellm_settings; those entries are taken as ours, not added twice.
OWN_CALLBACKS = ("proxy.usage.usage_logger", "proxy.usage.trace.usage_logger")
OWN_PROVIDERS = {"tinygrad"}


def configure_litellm(settings: Settings) -> None:
    """litellm_settings from config.yaml, with the dotted names of callbacks and handlers imported; our usage
    callback and tinygrad provider are added whatever the config says (it may add others, not remove ours)."""
    from proxy.routing.tinygrad_provider import PROVIDER, provider
    from proxy.usage.trace import usage_logger

    check_against_litellm(settings)
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.CRITICAL)  # its errors repeat what we report, keys included
    logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)
    callbacks: list[Any] = [usage_logger]
    providers: list[dict[str, Any]] = [{"provider": PROVIDER, "custom_handler": provider}]
    for key, value in settings.litellm_settings.items():
        if key == "callbacks":
            callbacks += [import_object(v, f"litellm_settings.callbacks[{i}]") if isinstance(v, str) else v
                          for i, v in enumerate(value) if v not in OWN_CALLBACKS and v is not usage_logger]
        elif key == "custom_provider_map":
            providers += [{**item, "custom_handler": import_object(item["custom_handler"],
                                                                   f"litellm_settings.custom_provider_map[{i}]")}
                          if isinstance(item.get("custom_handler"), str) else item
                          for i, item in enumerate(value) if item.get("provider") not in OWN_PROVIDERS]
        else:
            setattr(litellm, key, value)
    litellm.callbacks = callbacks  # type: ignore[assignment]
    litellm.custom_provider_map = providers  # type: ignore[assignment]
    from litellm.utils import custom_llm_setup

    custom_llm_setup()


Routing = tuple[litellm.Router, dict[str, "Deployment"]]


def build_router(settings: Settings) -> Routing:
    configure_litellm(settings)
    model_list = []
    deployments: dict[str, Deployment] = {}
    for i, d in enumerate(settings.model_list):
        info = dict(d.get("model_info") or {})
        info.setdefault("id", deployment_id(i, d["model_name"]))
        params = d["litellm_params"]
        deployment = Deployment(info["id"], d["model_name"], params["model"], params.get("api_base"),
                                info.get("power_watts"))
        if deployment.is_local:
            info.update({key: info.get(key, 0.0) for key in FREE})
        model_list.append({**d, "model_info": info})
        deployments[info["id"]] = deployment
    router_settings = dict(settings.router_settings)
    if "redis_port" in router_settings:  # from os.environ/... it is a string
        router_settings["redis_port"] = int(router_settings["redis_port"])
    try:
        router = litellm.Router(model_list=model_list, **router_settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"router_settings: LiteLLM refused them: {e}") from e
    return router, deployments


def active_cooldowns(router: litellm.Router, ids: list[str]) -> dict[str, float]:
    """Seconds of cooldown left for each id in `ids` that is cooling down."""
    import time

    now = time.time()
    left = {}
    for model_id, value in router.health().cooldowns.get_active_cooldowns(ids, None):
        remaining = float(value.get("timestamp", now)) + float(value.get("cooldown_time", 0)) - now
        if remaining > 0:
            left[model_id] = remaining
    return left



def cool_down(router: litellm.Router, deployment: str, reason: str, seconds: float) -> None:
    """Take a deployment out of rotation for `seconds`, as the Router does after failures: its chains fall back
    without trying it. Shared through Redis when the Router's cooldowns are."""
    router.health().cooldowns.add_deployment_to_cooldown(deployment, RuntimeError(reason), 503, seconds)
