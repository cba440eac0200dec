"""Templates: pre-booted snapshots that sandboxes are restored from, never cold-booted.

Building one boots an image once, waits for the guest agent, snapshots the VM and flattens its root
disk. A template directory is immutable once published (built under a temporary name, renamed into
place)::

    <templates_dir>/<name>/
        manifest.json      what it was built from and for which machine (:class:`TemplateManifest`)
        snapshot/          the VMM's snapshot: vmstate + snapshot.json (machine pinned)
        memory             guest RAM at the snapshot (sparse)
        rootfs.ext4        the root disk at the snapshot, flattened: the base of every sandbox disk

Starting a VM from a template (:meth:`Templates.start`) maps the template's RAM privately by default:
nothing is copied, clones share the pages they have not written through the page cache, and the
template file never changes. Pausing such a clone writes its RAM into the state file (about what the
guest uses, ~0.2 s); the VM it is resumed into then has a RAM file of its own, and every later pause
costs only the device state. A placement can instead ask for its own copy of the RAM up front (a reflink
where the filesystem can, else a copy of the data extents), which makes the first pause cheap too at
the price of the copy on the create path (~0.1 s for a 256 MiB guest on ext4). Every start ends with the
agent's ``/init``: clones of one snapshot would otherwise share the guest's clock and CRNG state.
"""

from wrenbox.templates.host import build_template, host_templates
from wrenbox.templates.store import Placement, Template, TemplateConfig, TemplateManifest, Templates
from wrenbox.templates.vm import agent_client, agent_ready, copy_ram

__all__ = [
    "Placement",
    "Template",
    "TemplateConfig",
    "TemplateManifest",
    "Templates",
    "agent_client",
    "agent_ready",
    "build_template",
    "copy_ram",
    "host_templates",
]
