#!/usr/bin/env bash
# `make run`: the all-in-one service with a sample config against a local mosquitto.
# Writes run/etc-tedge/tedge.toml once (edit it freely afterwards), starts mosquitto on
# 127.0.0.1:1883 when nothing listens there, then runs `tedge-firmware run` in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
config_dir=${1:-run/etc-tedge}
data_dir=$(pwd)/run/data
mkdir -p "$config_dir" "$data_dir"
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
port = 1883

[http.bind]
address = "127.0.0.1"
port = 8000

[data]
path = "$data_dir"

[firmware.child.update]
timeout = 3600
TOML
  echo "wrote $config_dir/tedge.toml"
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  echo "starting $mosquitto_bin on 127.0.0.1:1883"
  "$mosquitto_bin" -p 1883 -d
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
fi
exec .venv/bin/tedge-firmware run --config-dir "$config_dir"
