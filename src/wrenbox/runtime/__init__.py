"""The host runtime: sandbox lifecycle steps on this machine (VMs, disks, slots, memory snapshots)."""

from wrenbox.runtime.host import HostRuntime, RuntimeConfig

__all__ = ["HostRuntime", "RuntimeConfig"]
