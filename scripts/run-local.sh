#!/usr/bin/env bash
# `make run`: the all-in-one service with a sample config against a local mosquitto.
# Writes <config-dir>/tedge.toml once (edit it freely afterwards). Uses the MQTT broker that
# listens on 127.0.0.1:$MQTT_PORT (default 1883) and says so; when none does, starts mosquitto
# there and stops it again when the service stops (Ctrl-C). Then runs `tedge-firmware run`,
# its file transfer on 127.0.0.1:$HTTP_PORT (default 8000), its data next to the config dir.
set -euo pipefail
cd "$(dirname "$0")/.."
config_dir=${1:-run/etc-tedge}
port=${MQTT_PORT:-1883}
http_port=${HTTP_PORT:-8000}
mkdir -p "$config_dir"
data_dir=$(cd "$(dirname "$config_dir")" && pwd)/data
mkdir -p "$data_dir"
if [ ! -f "$config_dir/tedge.toml" ]; then
  cat > "$config_dir/tedge.toml" <<TOML
# Sample configuration written by \`make run\` (thin-edge v2 layout).
[config]
version = "2"

[device]
id = "sample-gateway"

[c8y]
url = "example.cumulocity.com"

[mqtt.client]
host = "127.0.0.1"
port = $port

[http.bind]
address = "127.0.0.1"
port = $http_port

[data]
path = "$data_dir"

[firmware.child.update]
timeout = 3600
TOML
  echo "wrote $config_dir/tedge.toml"
fi

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if listening; then
  echo "using the MQTT broker already listening on 127.0.0.1:$port"
else
  mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  # a session of its own: Ctrl-C stops the service first (it says "down"), then the broker
  setsid "$mosquitto_bin" -p "$port" >/dev/null 2>&1 &
  broker=$!
  stop_broker() { kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; echo "stopped mosquitto (pid $broker)"; }
  trap stop_broker EXIT
  trap 'exit 130' INT TERM
  echo "started $mosquitto_bin on 127.0.0.1:$port (pid $broker; stopped when the service stops)"
  for _ in $(seq 50); do listening && break; sleep 0.1; done
fi
# not exec: the trap above must run when the service has stopped
.venv/bin/tedge-firmware --config-dir "$config_dir" run
