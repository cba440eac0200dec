"""A WebSocket echo server in the standard library alone (the guest image has no WebSocket package), for
the proxy's pass-through test: ``python3 ws_echo.py PORT``. Echoes text and binary messages with a
prefix, answers the subprotocol ``echo`` if offered, and closes when asked."""

import base64
import hashlib
import socket
import struct
import sys
import threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def frame(opcode: int, payload: bytes) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def serve(conn: socket.socket) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    headers = {}
    for line in request.decode().split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest()).decode()
    reply = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n"
    )
    if "echo" in headers.get("sec-websocket-protocol", ""):
        reply += "Sec-WebSocket-Protocol: echo\r\n"
    reply += f"X-Seen-Header: {headers.get('x-probe', '')}\r\n"
    conn.sendall((reply + "\r\n").encode())
    while True:
        b1, b2 = read_exact(conn, 2)
        opcode, n = b1 & 0x0F, b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", read_exact(conn, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", read_exact(conn, 8))[0]
        mask = read_exact(conn, 4) if b2 & 0x80 else b"\0\0\0\0"
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(read_exact(conn, n)))
        if opcode == 8:
            conn.sendall(frame(8, payload[:2]))
            return
        if opcode == 1:
            conn.sendall(frame(1, b"echo: " + payload))
        elif opcode == 2:
            conn.sendall(frame(2, b"echo:" + payload))
        elif opcode == 9:
            conn.sendall(frame(10, payload))


def main() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[1])))
    server.listen(8)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=lambda c=conn: (serve(c), c.close()), daemon=True).start()


main()
