"""Virtual machine monitors: the driver interface (:mod:`wrenbox.vmm.base`) and its implementations
(:mod:`wrenbox.vmm.qemu`; a Firecracker driver for KVM hosts follows the same interface)."""
