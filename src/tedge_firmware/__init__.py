"""tedge-firmware: firmware management for Cumulocity child devices behind thin-edge.io."""

__version__ = "0.1.0"
