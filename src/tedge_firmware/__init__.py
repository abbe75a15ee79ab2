"""tedge-firmware: firmware management for Cumulocity child devices behind a thin-edge.io gateway."""

__version__ = "0.1.0"
