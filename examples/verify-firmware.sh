#!/bin/sh
# Verify step for: tedge-firmware connector ... --verify-command /usr/local/bin/verify-firmware.sh
#
# Run only when an apply was interrupted (the connector crashed, the device rebooted), with the
# same environment as the apply step. Exit 0: FIRMWARE_VERSION is installed (reported
# successful). Anything else: failed, with the last line of standard error as the reason.
set -eu

SLOT_DIR=${SLOT_DIR:-/var/lib/firmware}
running=$(cat "$SLOT_DIR/version" 2>/dev/null || echo none)
if [ "$running" != "$FIRMWARE_VERSION" ]; then
    echo "version $running is installed, not $FIRMWARE_VERSION" >&2
    exit 1
fi
