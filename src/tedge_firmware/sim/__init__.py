"""A Cumulocity simulator for tests, demos and manual trials; never imported by daemon code.

It plays the tenant's side of the cloud bridge on the local broker and serves firmware
binaries over HTTP:

    async with C8ySimulator(mqtt_port=1883, gateway_id="my-gateway") as sim:
        url = sim.add_file("image.bin", data, faults=FileFaults(cut_after=1000))
        await sim.wait_for_device("child1")            # its 101 and 114 came from the gateway
        op = sim.create_firmware_operation("child1", "image", "1.0", url)   # 515 on c8y/s/ds
        await sim.wait_for(op.id, OperationStatus.SUCCESSFUL)
        assert sim.inventory["child1"].firmware == Firmware("image", "1.0", url)
        assert sim.errors == []                        # nothing Cumulocity would refuse

The rules it enforces are described in `tedge_firmware.sim._model`; the HTTP faults in
`tedge_firmware.sim._files`. `json_operations=True` delivers every operation in its JSON form
too and takes statuses by id. `MapperModelRunner` is a model (not thin-edge) of thin-edge's
mapper for `te/` children: `tedge_firmware.sim._mapper`.
"""

from __future__ import annotations

from tedge_firmware.errors import SimulatorError
from tedge_firmware.sim._cloud import DEFAULT_CLIENT_ID, SUBSCRIPTIONS
from tedge_firmware.sim._control import CONTROL_PREFIX
from tedge_firmware.sim._files import BINARIES_PATH, FileFaults, FileStats
from tedge_firmware.sim._mapper import MapperModelRunner, ThinEdgeMapperModel
from tedge_firmware.sim._model import (
    FIRMWARE,
    BulkOperation,
    BulkProgress,
    BulkStatus,
    Device,
    Downstream,
    Firmware,
    Operation,
    OperationStatus,
    StatusChange,
    Tenant,
    Violation,
)
from tedge_firmware.sim._simulator import (
    DEFAULT_GATEWAY_ID,
    C8ySimulator,
    SimStats,
    make_token,
)

__all__ = [
    "BINARIES_PATH",
    "CONTROL_PREFIX",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_GATEWAY_ID",
    "FIRMWARE",
    "SUBSCRIPTIONS",
    "BulkOperation",
    "BulkProgress",
    "BulkStatus",
    "C8ySimulator",
    "Device",
    "Downstream",
    "FileFaults",
    "FileStats",
    "Firmware",
    "MapperModelRunner",
    "Operation",
    "OperationStatus",
    "SimStats",
    "SimulatorError",
    "StatusChange",
    "Tenant",
    "ThinEdgeMapperModel",
    "Violation",
    "make_token",
]
