"""What this host can do: ``HostCapabilities.probe(data_dir, images_dir)``, the library behind
``wrenbox doctor`` (KVM proved by booting a guest, TSC, device-mapper, reflink, userfaultfd, netns/tap/nft,
tools) and the backends it chooses."""

from wrenbox.probe.capabilities import Choice, HostCapabilities, Resources, Tool
from wrenbox.probe.kvm import KvmVerdict
from wrenbox.probe.probes import Check, NetworkChecks

__all__ = ["Check", "Choice", "HostCapabilities", "KvmVerdict", "NetworkChecks", "Resources", "Tool"]
