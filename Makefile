# tedge-firmware developer commands. `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG_DIR ?= run/etc-tedge

.PHONY: venv test lint run demo demo-secure demo-broker bench mosquitto mosquitto-clients clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Make sure a mosquitto binary exists (and, for the tests, its clients: the README's manual
# trial, which a test runs, uses them): install them from the OS packages when we are root.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || $(INSTALL_MOSQUITTO)

mosquitto-clients: mosquitto
	@command -v mosquitto_pub >/dev/null 2>&1 || $(INSTALL_MOSQUITTO)

INSTALL_MOSQUITTO = { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing mosquitto from the OS packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	  else \
	    echo "mosquitto is missing: install it (e.g. sudo apt-get install mosquitto mosquitto-clients) and retry" >&2; \
	    exit 1; \
	  fi; }

test: venv mosquitto-clients
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src

# The whole stack on this machine and a firmware rollout to simulated children, with a live view
# (README "Demo"). Options: make demo DEMO_ARGS="--children 50 --size 256MiB --fail 2"
# Mosquitto when it is installed or can be (root); otherwise the embedded broker, a demo-only
# fallback (README "Demo": its limits), which `demo --broker auto` then picks.
demo: venv
	@$(MAKE) --no-print-directory mosquitto || { \
	  echo "make demo: going on without mosquitto, with the demo's embedded broker (amqtt)"; \
	  $(MAKE) --no-print-directory demo-broker; }
	$(BIN)/tedge-firmware demo $(DEMO_ARGS)

# The same rollout on a locked site: every MQTT client on Mosquitto's TLS listener with a
# client certificate and the generated ACL, every download over HTTPS with a client
# certificate (README "Demo"). Needs Mosquitto: installed here when we are root.
demo-secure: venv mosquitto
	$(BIN)/tedge-firmware demo --secure $(DEMO_ARGS)

# The demo's embedded broker (amqtt) in the venv: the `demo-broker` extra.
demo-broker: venv
	$(BIN)/pip install --quiet -e '.[demo-broker]'

# The all-in-one service with a sample config against a local mosquitto (see README).
run: venv mosquitto
	scripts/run-local.sh $(CONFIG_DIR)

# Benchmarks against curl and nginx (docs/benchmarks.md); not part of `make test`. Installs nginx
# from the OS packages when it is missing and we are root. Quick run: make bench BENCH_ARGS=--quick
bench: venv mosquitto
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx from the OS packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; \
	  else \
	    echo "nginx is missing: install it (e.g. sudo apt-get install nginx-light) and retry" >&2; \
	    exit 1; \
	  fi; }
	@command -v curl >/dev/null 2>&1 || { echo "curl is missing: apt-get install curl" >&2; exit 1; }
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache
