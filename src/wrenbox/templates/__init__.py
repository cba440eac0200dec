"""Templates: pre-booted snapshots that sandboxes are restored from, never cold-booted.

Owns the template directories and everything about their files: building one from an image
(:class:`TemplateBuilder`: boot once, warm up, snapshot, flatten the root disk), deriving one from a
sandbox (:meth:`TemplateLibrary.derive`, which the host runtime fills), publishing, listing and deleting.
A template directory is immutable once published (written as a :class:`Draft` under a temporary name,
renamed into place)::

    <templates_dir>/<name>/
        manifest.json      what it was built from and for which machine (:class:`TemplateManifest`)
        snapshot/          the VMM's snapshot: vmstate + snapshot.json (machine pinned)
        memory             guest RAM at the snapshot (sparse)
        rootfs.ext4        the root disk at the snapshot, flattened: the base of every sandbox disk

A VM started from a template gets its own copy of the template's RAM (:meth:`Template.copy_memory`) and
maps that copy shared: guest writes land in it, a pause then costs only the device state, and memory the
guest frees becomes holes in it. Every start ends with the agent's ``/init``: clones of one snapshot
would otherwise share the guest's clock and CRNG (the host runtime's job).
"""

from wrenbox.templates.builder import TemplateBuilder
from wrenbox.templates.library import Draft, Template, TemplateLibrary, TemplateManifest

__all__ = ["Draft", "Template", "TemplateBuilder", "TemplateLibrary", "TemplateManifest"]
