"""`python -m tedge_firmware` is `tedge-firmware`."""

from tedge_firmware.cli.main import main

main()
