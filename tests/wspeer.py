"""A raw WebSocket peer that treats pings the way every real client does: it answers them.

wsraw.RawClient shows every frame the server sends. The server's keepalive may ping at any
moment, so tests about other things read through Peer, which answers each ping with its
pong and hides it.
"""

from __future__ import annotations

from tests.wsraw import RawClient

OP_PING, OP_PONG = 0x9, 0xA


class Peer(RawClient):
    """RawClient whose recv_frame (and so recv_close_code) answers and skips pings."""

    def recv_frame(self) -> tuple[bool, int, bytes] | None:
        for _ in range(1000):
            frame = super().recv_frame()
            if frame is None or frame[1] != OP_PING:
                return frame
            self.send_frame(OP_PONG, frame[2])
        raise AssertionError("the server sent nothing but pings")
