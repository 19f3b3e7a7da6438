"""What the proxy and the backend both need to serve HTTP, in one place so that the two cannot drift apart:
`header_timeout.py` (uvicorn's protocol with a header timeout, against slowloris), `listen.py` (the port,
bound before anything slow starts) and `json_body.py` (what a client's JSON body may not carry).

It imports neither proxy/ nor tinygrad_backend/, nor LiteLLM or tinygrad: both sides import it at start-up.
"""
