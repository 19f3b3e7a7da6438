"""Delegate: an OpenAI- and Anthropic-compatible proxy that hands routine LLM work to local models.

The one setting every part needs before anything else runs: LiteLLM reads LITELLM_LOCAL_MODEL_COST_MAP at
import and otherwise fetches its price table from the internet (three tries, seconds offline; on a connected
machine the savings would silently be priced from whatever table it downloaded). Any import of ours passes
through here first, so it is set before any `import litellm` in the process.
"""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
