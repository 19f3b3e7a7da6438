"""Where a request goes: LiteLLM's Router built from config.yaml, our tinygrad provider, and the deployments' health."""
