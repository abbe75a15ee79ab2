#!/bin/sh
# Apply step for: tedge-firmware connector --child-id ID --apply-command /usr/local/bin/apply-firmware.sh
#
# The connector runs it once per firmware, after the download and the SHA-256 check, with:
#   FIRMWARE_FILE     the verified file (removed by the connector when the operation ends)
#   FIRMWARE_NAME, FIRMWARE_VERSION, FIRMWARE_SHA256, OPERATION_ID, ATTEMPT, CHILD_ID
# Exit 0: applied. Any other exit status: failed, and the last line written to standard
# error is the reason Cumulocity shows. It may reboot the device: after the restart the
# connector asks the verify step (verify-firmware.sh) whether the new version is running.
set -eu

SLOT_DIR=${SLOT_DIR:-/var/lib/firmware}   # where this example "flashes" to

fail() {
    echo "$*" >&2
    exit 1
}

[ -s "$FIRMWARE_FILE" ] || fail "firmware $FIRMWARE_NAME $FIRMWARE_VERSION is empty"
mkdir -p "$SLOT_DIR" || fail "cannot create $SLOT_DIR"

echo "installing $FIRMWARE_NAME $FIRMWARE_VERSION (operation $OPERATION_ID, attempt $ATTEMPT)"
# Write the inactive slot first, then switch: an interruption leaves the old firmware bootable.
cp "$FIRMWARE_FILE" "$SLOT_DIR/inactive.img.tmp" || fail "cannot write the inactive slot"
sync
mv "$SLOT_DIR/inactive.img.tmp" "$SLOT_DIR/inactive.img"
echo "$FIRMWARE_VERSION" > "$SLOT_DIR/next-version"
mv "$SLOT_DIR/inactive.img" "$SLOT_DIR/active.img"
mv "$SLOT_DIR/next-version" "$SLOT_DIR/version"
echo "installed $FIRMWARE_NAME $FIRMWARE_VERSION"

# A real device would boot into the new slot now, e.g.:
# [ "${REBOOT:-0}" = 1 ] && systemctl reboot
exit 0
