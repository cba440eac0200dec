"""``python -m wrenbox.guest [--listen HOST:PORT] [--log-level LEVEL] [--keep-alive S] [--body-timeout S]``.

``--keep-alive``: an idle connection (or one whose request headers never complete) is closed after S
seconds (default 65); ``--body-timeout``: a request body that stalls for S seconds is refused (default 60).
Binds, prints ``listening on http://HOST:PORT`` on stdout (with the real port when 0 was asked for),
then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: python -m wrenbox.guest [--listen HOST:PORT] [--log-level debug|info|warning|error]"
    " [--keep-alive SECONDS] [--body-timeout SECONDS]"
)
DEFAULT_LISTEN = "0.0.0.0:49983"


def parse_args(argv: list[str]) -> tuple[str, int, str, dict[str, float]]:
    """(host, port, log level, timeouts for AgentConfig); exits with the usage on anything unexpected."""
    options = {"--listen": DEFAULT_LISTEN, "--log-level": "info"}
    options |= {"--keep-alive": "65", "--body-timeout": "60"}
    args = list(argv)
    while args:
        name = args.pop(0)
        name, eq, inline = name.partition("=")
        if name in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if name not in options or not (eq or args):
            sys.exit(USAGE)
        options[name] = inline if eq else args.pop(0)
    host, _, port = options["--listen"].rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        sys.exit(f"invalid --listen {options['--listen']!r}: expected HOST:PORT\n{USAGE}")
    timeouts = {}
    for option, field in (("--keep-alive", "keep_alive_timeout"), ("--body-timeout", "body_timeout")):
        try:
            timeouts[field] = float(options[option])
        except ValueError:
            timeouts[field] = 0.0
        if not 0 < timeouts[field] < 86400:  # NaN too
            sys.exit(f"invalid {option} {options[option]!r}: expected seconds\n{USAGE}")
    return host.strip("[]"), int(port), options["--log-level"].upper(), timeouts


def main(argv: list[str] | None = None) -> None:
    host, port, level, timeouts = parse_args(sys.argv[1:] if argv is None else argv)
    import asyncio
    import logging

    logging.basicConfig(level=level, format="%(asctime)s wrenbox.guest %(levelname)s %(message)s")
    from .agent import Agent, AgentConfig
    from .server import bind, serve

    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"listening on http://{shown}:{bound_port}", flush=True)
    agent = Agent(AgentConfig(host=bound_host, port=bound_port, **timeouts))
    asyncio.run(serve(agent, sock))


if __name__ == "__main__":
    main()
