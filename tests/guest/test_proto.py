"""Our generated envd protocol modules must describe exactly the services the e2b SDK speaks."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from e2b.envd.filesystem import filesystem_pb as e2b_filesystem_pb
from e2b.envd.process import process_pb as e2b_process_pb
from protobuf.wkt.google.protobuf.descriptor_pb import FileDescriptorProto

from wrenbox.proto.filesystem import filesystem_pb
from wrenbox.proto.process import process_pb


def _descriptor(module: ModuleType) -> dict[str, object]:
    proto = module.desc().proto
    assert isinstance(proto, FileDescriptorProto)
    described = json.loads(proto.to_json())
    # Language options (java_package, ...) are code-generation details of E2B's build, not wire format.
    described.pop("options", None)
    described.pop("sourceCodeInfo", None)
    return described


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(process_pb, e2b_process_pb), (filesystem_pb, e2b_filesystem_pb)],
    ids=["process", "filesystem"],
)
def test_descriptor_matches_e2b(ours: ModuleType, theirs: ModuleType) -> None:
    assert _descriptor(ours) == _descriptor(theirs)


def test_messages_round_trip_between_ours_and_e2b() -> None:
    from protobuf import Oneof

    event = process_pb.ProcessEvent(
        event=Oneof("end", process_pb.ProcessEvent.EndEvent(exit_code=-3, exited=True, status="x", error="e"))
    )
    decoded = e2b_process_pb.ProcessEvent.from_binary(event.to_binary())
    assert decoded.event.field == "end"
    assert decoded.event.value.exit_code == -3
    assert decoded.event.value.error == "e"
