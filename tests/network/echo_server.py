"""A tiny TCP server for the network tests: answers every connection with one line
``<name> <local address> <peer address>`` and closes it. Prints ``ready <port>`` once listening."""

import socket
import sys

name, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server(("0.0.0.0", port), reuse_port=False)
print("ready", server.getsockname()[1], flush=True)
while True:
    conn, (peer, _) = server.accept()
    with conn:
        conn.sendall(f"{name} {conn.getsockname()[0]} {peer}\n".encode())
