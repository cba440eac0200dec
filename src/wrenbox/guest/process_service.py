"""The ``process.Process`` Connect service, on top of :mod:`wrenbox.guest.processes`."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from wrenbox.errors import InvalidArgument
from wrenbox.proto.process import process_pb as pb

from .agent import Agent
from .paths import resolve
from .processes import Exit, ManagedProcess, Subscription
from .rpc import StreamClock, acting_user, connect_errors, deadline_error, require
from .spawn import Spawn

__all__ = ["ProcessService"]

_SIGNALS = {pb.Signal.SIGTERM: signal.SIGTERM, pb.Signal.SIGKILL: signal.SIGKILL}
_KEEPALIVE = pb.ProcessEvent(event=Oneof("keepalive", pb.ProcessEvent.KeepAlive()))


class ProcessService:
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def list(self, request: pb.ListRequest, ctx: RequestContext) -> pb.ListResponse:
        return pb.ListResponse(
            processes=[pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag) for p in self._agent.processes]
        )

    async def start(self, request: pb.StartRequest, ctx: RequestContext) -> AsyncIterator[pb.StartResponse]:
        with connect_errors():
            process = self._agent.processes.start(self._spawn(request, ctx), request.process)
            subscription = process.subscribe(replay=False)
        async for event in self._follow(process, subscription, ctx):
            yield pb.StartResponse(event=event)

    async def connect(
        self, request: pb.ConnectRequest, ctx: RequestContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        with connect_errors():
            process = self._find(request.process, exited=True)
            subscription = process.subscribe(replay=True)
        async for event in self._follow(process, subscription, ctx):
            yield pb.ConnectResponse(event=event)

    async def update(self, request: pb.UpdateRequest, ctx: RequestContext) -> pb.UpdateResponse:
        with connect_errors():
            process = self._find(request.process)
            if request.pty is not None and request.pty.size is not None:
                process.resize(request.pty.size.cols, request.pty.size.rows)
        return pb.UpdateResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext
    ) -> pb.StreamInputResponse:
        process: ManagedProcess | None = None
        with connect_errors():
            async for message in request:
                match message.event:
                    case Oneof(field="start", value=start):
                        process = self._find(start.process)
                    case Oneof(field="data", value=data):
                        if process is None:
                            raise InvalidArgument("the input stream must begin with a start event")
                        await self._write(process, data.input, ctx)
        return pb.StreamInputResponse()

    async def send_input(self, request: pb.SendInputRequest, ctx: RequestContext) -> pb.SendInputResponse:
        with connect_errors():
            await self._write(self._find(request.process), request.input, ctx)
        return pb.SendInputResponse()

    async def send_signal(self, request: pb.SendSignalRequest, ctx: RequestContext) -> pb.SendSignalResponse:
        with connect_errors():
            process = self._find(request.process)
            sig = _SIGNALS.get(request.signal)
            if sig is None:
                raise InvalidArgument("signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
            process.signal(sig)
        return pb.SendSignalResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: RequestContext) -> pb.CloseStdinResponse:
        with connect_errors():
            self._find(request.process).close_stdin()
        return pb.CloseStdinResponse()

    # -- helpers ------------------------------------------------------------------------------

    def _spawn(self, request: pb.StartRequest, ctx: RequestContext) -> Spawn:
        config = request.process
        require(config, "process")
        assert config is not None
        if not config.cmd:
            raise InvalidArgument("process.cmd is required")
        argv = [config.cmd, *config.args]
        envs = dict(config.envs)
        if any("\0" in s for s in (*argv, *envs, *envs.values())) or any("=" in k for k in envs):
            raise InvalidArgument("command, arguments and environment must not contain NUL ('=' in a name)")
        user = acting_user(self._agent, ctx)
        if config.has_field("cwd") and config.cwd:
            cwd = resolve(config.cwd, user, self._agent.default_workdir)
        else:
            cwd = resolve("", user, self._agent.default_workdir)
            if not os.path.isdir(cwd):  # e.g. nobody's /nonexistent home: start in / rather than fail
                cwd = "/"
        size = request.pty.size if request.pty is not None else None
        return Spawn(
            argv=argv,
            env=self._agent.process_env(user, envs),
            cwd=cwd,
            user=user,
            tag=request.tag if request.has_field("tag") else None,
            stdin=request.stdin if request.has_field("stdin") else True,
            pty_size=None if request.pty is None else ((size.cols, size.rows) if size else (80, 24)),
        )

    def _find(self, selector: pb.ProcessSelector | None, *, exited: bool = False) -> ManagedProcess:
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=pid):
                return self._agent.processes.find(pid=pid, exited=exited)
            case Oneof(field="tag", value=tag):
                return self._agent.processes.find(tag=tag, exited=exited)
        raise InvalidArgument("a process selector (pid or tag) is required")

    async def _write(
        self, process: ManagedProcess, data: pb.ProcessInput | None, ctx: RequestContext
    ) -> None:
        match data.input if data is not None else None:
            case Oneof(field="stdin", value=chunk):
                pty = False
            case Oneof(field="pty", value=chunk):
                pty = True
            case _:
                raise InvalidArgument("input must be stdin or pty data")
        remaining = ctx.timeout_ms
        try:
            async with asyncio.timeout(None if remaining is None else remaining / 1000):
                await process.write_input(chunk, pty=pty)
        except TimeoutError:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED, f"process {process.pid} did not read its input in time"
            ) from None

    async def _follow(
        self, process: ManagedProcess, subscription: Subscription, ctx: RequestContext
    ) -> AsyncIterator[pb.ProcessEvent]:
        """Start event, (replayed) output, then the end; keepalives while quiet."""
        clock = StreamClock(ctx, self._agent.config.keepalive)
        try:
            yield pb.ProcessEvent(event=Oneof("start", pb.ProcessEvent.StartEvent(pid=process.pid)))
            while True:
                with connect_errors():
                    item = await subscription.next(clock.wait())
                if item is None:
                    if clock.expired():
                        raise deadline_error(f"process {process.pid} keeps running; reattach with Connect")
                    yield _KEEPALIVE
                elif isinstance(item, Exit):
                    yield _end_event(item)
                    return
                else:
                    kind, data = item
                    yield pb.ProcessEvent(
                        event=Oneof("data", pb.ProcessEvent.DataEvent(output=Oneof(kind, data)))
                    )
        finally:
            subscription.close()


def _end_event(exit: Exit) -> pb.ProcessEvent:
    end = pb.ProcessEvent.EndEvent(
        exit_code=exit.exit_code, exited=exit.exited, status=exit.status, error=exit.error
    )
    return pb.ProcessEvent(event=Oneof("end", end))
