"""The package's layers as they run: the wire loads without tornado or asyncio, and the
unmasking a parser is given by default agrees with the seam's C one the server uses.

lint-imports (setup.cfg, run by .ci/run) checks the import contract statically; these check
what it cannot: what an import really loads, and that the injected functions agree.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from echoserver.transport.tornado_seam import websocket_mask
from echoserver.wire.framing import MESSAGE, OP_TEXT, FrameParser, python_unmask


def test_the_wire_loads_neither_tornado_nor_asyncio() -> None:
    code = (
        "import sys\n"
        "import echoserver.wire.deflate, echoserver.wire.envelopes, echoserver.wire.framing\n"
        "import echoserver.wire.handshake, echoserver.wire.hosts, echoserver.wire.protocol\n"
        "import echoserver.wire.shared\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tornado', 'asyncio')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 4099, 65536 + 7])
def test_python_unmask_agrees_with_the_seams(size: int) -> None:
    for _ in range(5):
        mask, data = os.urandom(4), os.urandom(size)
        assert python_unmask(mask, data) == websocket_mask(mask, data)


def test_a_parser_unmasks_with_what_it_is_given() -> None:
    mask = b"\x01\x02\x03\x04"
    masked = bytes([0x81, 0x80 | 5]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
    calls: list[bytes] = []

    def unmask(mask: bytes, data: bytes) -> bytes:
        calls.append(mask)
        return websocket_mask(mask, data)

    default = FrameParser(100).receive(masked)
    given = FrameParser(100, unmask=unmask).receive(masked)
    assert given == default == [(MESSAGE, OP_TEXT, b"hello")]
    assert calls == [mask]
