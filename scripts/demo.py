"""Demo (what ``make demo`` runs for now): start the guest agent, run a command through it, stop it.

The agent runs on the host here, on a free port; the command goes over one Connect RPC
(``process.Process/Start``, a server stream) made with our generated client. When the sandbox manager
lands, this grows into the full demo (create, exec, pause, resume, snapshot, fork).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from protobuf import Oneof

from wrenbox.pids import ProcessRef
from wrenbox.proto.process import process_pb as pb
from wrenbox.proto.process.process_connect import ProcessClientSync

COMMAND = ["/bin/sh", "-c", 'echo "hello from the wrenbox guest agent on $(uname -n)"; uname -srm; id -un']


def main() -> int:
    # SIGTERM (e.g. from `timeout`) must still run the finally below that stops the agent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    agent = subprocess.Popen(
        [sys.executable, "-m", "wrenbox.guest", "--listen", "127.0.0.1:0", "--log-level", "error"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        match = re.fullmatch(r"listening on (http://\S+)\n", agent.stdout.readline())
        if not match:
            print("the agent did not start", file=sys.stderr)
            return 1
        url = match[1]
        print(f"agent listening on {url} (pid {agent.pid})")
        client = ProcessClientSync(url, send_compression=None)
        request = pb.StartRequest(process=pb.ProcessConfig(cmd=COMMAND[0], args=COMMAND[1:]), stdin=False)
        print(f"$ {' '.join(COMMAND)}")
        exit_code = None
        for response in _with_retry(lambda: client.start(request, timeout_ms=30_000)):
            match response.event.event:
                case Oneof(field="start", value=start):
                    print(f"[started pid {start.pid}]")
                case Oneof(field="data", value=data):
                    sys.stdout.write(data.output.value.decode(errors="replace"))
                case Oneof(field="end", value=end):
                    exit_code = end.exit_code
                    print(f"[{end.status}]")
        client.close()
        print(f"done in {time.perf_counter() - started:.2f} s (agent start included)")
        return 0 if exit_code == 0 else 1
    finally:
        ProcessRef.of(agent.pid).terminate(grace=5)
        agent.wait()


def _with_retry(call: Callable[[], Iterator[pb.StartResponse]]) -> Iterator[pb.StartResponse]:
    """The agent prints its address before it serves; retry the first call for a few seconds."""
    from connectrpc.errors import ConnectError

    deadline = time.monotonic() + 10
    while True:
        try:
            stream = call()
            first = next(stream)
        except ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        yield first
        yield from stream
        return


if __name__ == "__main__":
    sys.exit(main())
