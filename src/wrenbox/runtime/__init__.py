"""The host runtime: sandbox lifecycle steps on a machine (VMs, disks, network slots, memory snapshots).

``base.Runtime`` is the interface the manager uses; ``host.HostRuntime`` implements it on this host.
"""
