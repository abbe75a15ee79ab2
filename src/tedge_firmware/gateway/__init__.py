"""The gateway's services: the firmware plugin, child registration, the cache keeper, and how
they run (lifecycle, logging, wiring)."""
