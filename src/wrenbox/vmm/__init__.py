"""Virtual machine monitors: the driver interface (:mod:`wrenbox.vmm.base`) and its implementations,
:mod:`wrenbox.vmm.qemu` and, for KVM hosts, :mod:`wrenbox.vmm.firecracker`."""
