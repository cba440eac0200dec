"""What this host can do: ``HostCapabilities.probe(settings)`` (the library behind ``wrenbox doctor``)."""

from wrenbox.probe.capabilities import Choice, HostCapabilities, Resources, Tool
from wrenbox.probe.kvm import KvmVerdict
from wrenbox.probe.probes import Check, NetworkChecks

__all__ = ["Check", "Choice", "HostCapabilities", "KvmVerdict", "NetworkChecks", "Resources", "Tool"]
