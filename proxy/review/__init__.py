"""Code review of a diff by the `review` alias (`delegate review`, `make review`). Client-side: no LiteLLM."""
