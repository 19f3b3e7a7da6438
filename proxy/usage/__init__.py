"""Usage and savings: one row per request, priced against the reference cloud model; keys and their budgets;
the report, the spend endpoints and the savings page. Nothing here imports LiteLLM at import time except
the modules that price (pricing.py) and record (trace.py, recorder.py), which only the server loads."""
