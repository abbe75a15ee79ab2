"""`python -m tedge_firmware` is `tedge-firmware`."""

from tedge_firmware.app.cli import main

main()
