"""Host-side client of the guest agent (envd): async :class:`AsyncEnvdClient`, blocking :class:`EnvdClient`.

Owns the envd protocol on the host side (Connect RPC, ``/files``, ``/init``); it holds no sandbox state.

Both speak to one agent described by an :class:`EnvdConfig`; operations live on ``client.processes``
and ``client.files``; results are the records in :mod:`wrenbox.envd.models`; failures are
:mod:`wrenbox.errors`.
"""

from wrenbox.envd.client import AsyncEnvdClient
from wrenbox.envd.endpoint import ENVD_PORT, EnvdConfig
from wrenbox.envd.models import (
    EntryInfo,
    ExecResult,
    Exited,
    FileType,
    Metrics,
    ProcessEvent,
    ProcessInfo,
    PtyOutput,
    Started,
    Stderr,
    Stdout,
    WatchEvent,
    WatchEventType,
    WriteInfo,
)
from wrenbox.envd.processes import DEFAULT
from wrenbox.envd.streams import ProcessStream, WatchStream
from wrenbox.envd.sync import EnvdClient, SyncEventStream, SyncProcessStream

__all__ = [
    "DEFAULT",
    "ENVD_PORT",
    "AsyncEnvdClient",
    "EntryInfo",
    "EnvdClient",
    "EnvdConfig",
    "ExecResult",
    "Exited",
    "FileType",
    "Metrics",
    "ProcessEvent",
    "ProcessInfo",
    "ProcessStream",
    "PtyOutput",
    "Started",
    "Stderr",
    "Stdout",
    "SyncEventStream",
    "SyncProcessStream",
    "WatchEvent",
    "WatchEventType",
    "WatchStream",
    "WriteInfo",
]
