"""What a request cost, and what the reference cloud model would have charged for the same tokens.

Every price comes from LiteLLM's own table (`litellm.cost_per_token`), never from numbers typed here.
A local deployment costs the electricity it drew: its power (model_info.power_watts in config.yaml)
times the time it spent generating, at delegate.electricity_usd_per_kwh. A cloud deployment costs its
real LiteLLM price.
"""

from __future__ import annotations

from dataclasses import dataclass

import litellm

from proxy.routing.router import Deployment


class PricingError(Exception):
    """A model LiteLLM's price table does not know."""


def token_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    try:
        prompt, completion = litellm.cost_per_token(model=model, prompt_tokens=prompt_tokens,
                                                    completion_tokens=completion_tokens)
    except Exception as e:
        raise PricingError(f"LiteLLM's price table has no price for {model!r}") from e
    return float(prompt) + float(completion)


def cloud_cost(model: str, prompt_tokens: int, completion_tokens: int, cache_creation_tokens: int,
               cache_read_tokens: int) -> float:
    """What Anthropic charges for a request it served: `prompt_tokens` counts every input token, cached or not;
    those written to or read from the prompt cache are priced at their own rates."""
    try:
        prompt, completion = litellm.cost_per_token(model=model, prompt_tokens=prompt_tokens,
                                                    completion_tokens=completion_tokens,
                                                    cache_creation_input_tokens=cache_creation_tokens,
                                                    cache_read_input_tokens=cache_read_tokens)
    except Exception as e:
        raise PricingError(f"LiteLLM's price table has no price for {model!r}") from e
    return float(prompt) + float(completion)


def check_reference_model(model: str) -> None:
    token_cost(model, 1, 1)


@dataclass(frozen=True)
class Costs:
    reference: float  # what the reference model would have charged
    local: float  # what serving it actually cost

    @property
    def saved(self) -> float:
        return self.reference - self.local


def energy_cost(watts: float, seconds: float, usd_per_kwh: float) -> float:
    return watts * seconds / 3_600_000 * usd_per_kwh


def costs(reference_model: str, deployment: Deployment | None, prompt_tokens: int, completion_tokens: int,
          generation_s: float, delivered: bool, usd_per_kwh: float, default_watts: float) -> Costs:
    """The reference price counts only work the client received (`delivered`: an answer, whole or cut short, with
    the tokens it carried); the local cost counts all work done."""
    reference = token_cost(reference_model, prompt_tokens, completion_tokens) if delivered else 0.0
    if deployment is None:
        return Costs(reference, 0.0)
    if deployment.is_local:
        watts = deployment.power_watts if deployment.power_watts is not None else default_watts
        return Costs(reference, energy_cost(watts, generation_s, usd_per_kwh))
    try:
        return Costs(reference, token_cost(deployment.model, prompt_tokens, completion_tokens))
    except PricingError:
        return Costs(reference, 0.0)
