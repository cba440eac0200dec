"""What this host can do: ``HostCapabilities.probe(settings)`` (the library behind ``wrenbox doctor``)."""

from wrenbox.host.capabilities import Choice, HostCapabilities, Resources, Tool
from wrenbox.host.kvm import KvmVerdict
from wrenbox.host.probes import Check, NetworkChecks

__all__ = ["Check", "Choice", "HostCapabilities", "KvmVerdict", "NetworkChecks", "Resources", "Tool"]
