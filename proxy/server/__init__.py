"""The proxy's HTTP server: admission, one module per endpoint family, health, and `delegate serve`."""
