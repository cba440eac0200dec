"""The host runtime: sandbox lifecycle steps on a machine (VMs, disks, network slots, memory snapshots).

Owns what a sandbox holds on this host (its :class:`~wrenbox.runtime.base.Resource` s) and its files
(:mod:`.files`). ``base.Runtime`` is the seam the manager uses; ``host.HostRuntime`` implements it with
the launcher, the rootfs backend, the network pool and the template store it is given; ``sweep``
removes what a crash left.
"""
