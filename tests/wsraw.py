"""A raw-socket WebSocket client for hand-built frames: what a broken or hostile peer sends."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
) -> bytes:
    """One client frame, any bits the caller likes (rsv is the 3-bit value 0..7)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawClient:
    """Handshake over a plain socket, then frames exactly as given."""

    def __init__(
        self,
        port: int,
        path: str = "/ws",
        timeout: float = 5.0,
        with_request: bytes = b"",
        receive_buffer: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Handshake; `with_request` bytes go in the same write as the HTTP request."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:  # before connect(), so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock = tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls else sock
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode() + with_request)
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **bits: object) -> None:
        self.sock.sendall(build_frame(opcode, payload, **bits))  # type: ignore[arg-type]

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def recv_frame(self) -> tuple[bool, int, bytes] | None:
        """(fin, opcode, payload) of the next server frame, None at EOF."""
        head = self._read(2)
        if head is None:
            return None
        first, second = head
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2) or b"\0\0")[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8) or b"\0" * 8)[0]
        payload = self._read(length) if length else b""
        if payload is None:
            return None
        return bool(first & 0x80), first & 0x0F, payload

    def recv_close_code(self) -> int | None:
        """Skip data frames until the close frame; its code (None for an empty close)."""
        while True:
            frame = self.recv_frame()
            assert frame is not None, "connection dropped without a close frame"
            _, opcode, payload = frame
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if payload else None

    def at_eof(self) -> bool:
        """True once the server has closed the TCP connection."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()
