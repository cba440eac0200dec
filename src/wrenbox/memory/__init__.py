"""Guest memory snapshots: a compact, chained, checksummed on-disk format, and serving it back.

Owns the memory snapshot format and every file of it (headers, diffs, chains); where a sandbox's
snapshot directory is belongs to the runtime.

Modules:

- :mod:`wrenbox.memory.format` — the header (seed version 1 read/written bit-exactly; version 2 with
  magic, counts and checksums), mappings, overlay / normalize / validate, lookup by bisection.
- :mod:`wrenbox.memory.chain` — :class:`~wrenbox.memory.chain.Chain`: a snapshot directory opened for
  reading (files checked, open and mapped): ``lookup``, ``mappings``, ``view``/``fileno``, ``materialize``.
- :mod:`wrenbox.memory.process` — raw memory to snapshot: ``process_full``, ``process_diff`` (exact:
  compared with the parent, or the VMM's sparse dirty file), ``collapse``; the caps on generations and
  stored size. Built on :mod:`~wrenbox.memory.scan` (which blocks hold data / changed) and
  :mod:`~wrenbox.memory.pack` (writing a checksummed diff file; reflinks on XFS/btrfs), with
  :mod:`~wrenbox.fileio`.
- :mod:`wrenbox.memory.writer` — :class:`~wrenbox.memory.writer.SnapshotWriter`: temp dir, fsync,
  atomic rename; ``reclaim`` for what a crash left behind.
- :mod:`wrenbox.memory.uffd` — the userfaultfd page server that serves a snapshot to Firecracker lazily;
  :class:`~wrenbox.memory.uffd.chain_source.ChainSource` is a snapshot chain as its memory source.

The memory part of a snapshot directory::

    memfile.header        version 2 header: which build's diff holds each block of guest memory
    memfile.<uuid>        one packed diff per build the header references (every file in the directory
                          is referenced: a directory is self-contained, older diffs are hard links)

Read-only compatibility with the seed's directories: version 1 headers, and the legacy name ``memfile``
for a generation-0 diff. wrenbox never writes ``memfile`` or ``memfile.raw`` (the raw input lives
wherever the VMM put it; the caller deletes it after a successful commit).

Everything here is blocking file I/O and CPU work (hundreds of MB/s to GB/s): from async code, run it
in a worker thread (``anyio.to_thread.run_sync``).

Lifecycle, as the sandbox manager drives it::

    # first pause: complete memory
    with SnapshotWriter(snap_dir, replace=True) as w:
        process_full(ram_file, w.path)
        w.commit()
    # resume. QEMU: rebuild a sparse RAM file. Firecracker: serve the chain with the page server
    with Chain.open(snap_dir) as chain:
        chain.materialize(ram_file)
    server = PageServer(socket_path, ChainSource.open(snap_dir))
    # next pause: only what changed, collapsed into one generation-0 file at the caps (8 generations, 2x RAM)
    with Chain.open(snap_dir) as parent, SnapshotWriter(snap_dir, replace=True) as w:
        process_diff(ram_file, parent, w.path)            # or kind=RawKind.SPARSE_DIFF for Firecracker
        w.commit()
"""
