"""Templates: pre-booted snapshots that sandboxes are restored from, never cold-booted.

Building one boots an image once, waits for the guest agent, snapshots the VM and flattens its root
disk. A template directory is immutable once published (built under a temporary name, renamed into
place)::

    <templates_dir>/<name>/
        manifest.json      what it was built from and for which machine (:class:`TemplateManifest`)
        snapshot/          the VMM's snapshot: vmstate + snapshot.json (machine pinned)
        memory             guest RAM at the snapshot (sparse)
        rootfs.ext4        the root disk at the snapshot, flattened: the base of every sandbox disk

Starting a VM from a template (:meth:`Templates.start`) gives it its own copy of the template's RAM
(a reflink where the filesystem can, else a kernel copy of the file's data extents, holes kept) and maps
that copy shared: guest writes land in it, a pause then costs only the device state, and memory the
guest frees becomes holes in it. Clones never map the template's file itself, not even privately: QEMU
7.2 punches holes into a ``share=off`` backing file when the guest frees memory (free page reporting),
which changed the template under every other clone (seen in this project's tests). Every start ends
with the agent's ``/init``: clones of one snapshot would otherwise share the guest's clock and CRNG.
"""

from wrenbox.templates.host import build_template, host_templates
from wrenbox.templates.store import (
    Placement,
    Template,
    TemplateConfig,
    TemplateManifest,
    Templates,
    TemplateStore,
)
from wrenbox.templates.vm import agent_client, agent_ready

__all__ = [
    "Placement",
    "Template",
    "TemplateConfig",
    "TemplateManifest",
    "TemplateStore",
    "Templates",
    "agent_client",
    "agent_ready",
    "build_template",
    "host_templates",
]
