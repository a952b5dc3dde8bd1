"""`load.py fanout`: members of one channel that broadcast on command from stdin.

Several of these processes share a channel (bench/fanout.py drives them); each reports,
per broadcast, how many of its members got it and when the first and last did, by the
time it read the frame or (--arrival kernel, KernelArrival) the kernel's receive stamp.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import procs
from load_client import (
    BINARY,
    SEQ_STAMP,
    Closing,
    connect_many,
    emit,
    error_counts,
    hold_limit,
    log,
    monotonic_ns,
    server_frame_header,
    wait_until,
)
from picows import WSFrame, WSMsgType, WSTransport

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # == SCM_TIMESTAMPNS
TIMESPEC = struct.Struct("ll")  # struct timespec: seconds, nanoseconds (native longs)


class FanoutRun:
    """One load process's share of a channel: per broadcast, how many of its connections got
    it and when the first and the last did (CLOCK_MONOTONIC, the same clock in every process
    of the machine, so the processes' timestamps compare)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}  # seq -> [count, first ns, last ns]
        self.times: dict[int, list[int]] = {}  # seq -> every receipt's ns, for its spread
        self.repeats = 0
        self.server_closes = 0
        self.disconnects = 0

    def delivered(self, seq: int, now: int | None = None) -> None:
        if now is None:
            now = monotonic_ns()
        self.times.setdefault(seq, []).append(now)
        entry = self.seen.get(seq)
        if entry is None:
            self.seen[seq] = [1, now, now]
        else:
            # Kernel stamps are recorded in member order, not arrival order.
            entry[0] += 1
            entry[1] = min(entry[1], now)
            entry[2] = max(entry[2], now)

    def percentiles(self, seq: int) -> list[int]:
        """Receipt times of `seq` at percentiles 0, 1, ..., 100 (nearest rank), or []."""
        times = sorted(self.times.pop(seq, []))
        if not times:
            return []
        last = len(times) - 1
        return [times[round(last * p / 100)] for p in range(101)]


class FanoutReceiver(Closing):
    """A member that records each broadcast's arrival; a repeated or older one is counted."""

    def __init__(self, run: FanoutRun) -> None:
        self.run = run
        self.expected = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in (BINARY, WSMsgType.TEXT):
            self.control(transport, frame)
            return
        seq = SEQ_STAMP.unpack_from(frame.get_payload_as_memoryview())[0]
        if seq < self.expected:
            self.run.repeats += 1
            return
        self.expected = seq + 1
        self.run.delivered(seq)


class KernelArrival:
    """Arrival by the kernel's receive timestamp, with the readers off the CPUs meanwhile.

    Before a broadcast every member stops reading (the transports are paused, so this
    process does nothing while the server fans out); after a deferral longer than the fan-out,
    each member's frame is read straight from its socket with recvmsg, whose SCM_TIMESTAMPNS
    says when the kernel queued it on the socket (CLOCK_REALTIME, turned into CLOCK_MONOTONIC
    here). Each socket is reached through a dup of its descriptor, one at a time, closed at
    once: the process holds close to its limit of open files. The frame is consumed there, so
    picows never sees it; reading resumes afterwards for whatever comes next.
    """

    def __init__(self, members: Sequence[tuple[WSTransport, FanoutReceiver]], size: int) -> None:
        self.members = members
        self.size = size
        self.header = server_frame_header(size)
        self.problems: dict[str, int] = {}

    @staticmethod
    def fd(transport: WSTransport) -> int:
        return int(transport.underlying_transport.get_extra_info("socket").fileno())

    def enable_timestamps(self) -> int:
        """SO_TIMESTAMPNS on every member; the kernel turns receive stamping on lazily (from
        a work queue) once some socket asks, so give it a moment before the first broadcast."""
        enabled = 0
        for transport, _listener in self.members:
            if transport.is_disconnected:
                continue
            with socket.socket(fileno=os.dup(self.fd(transport))) as sock:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            enabled += 1
        return enabled

    def pause(self) -> None:
        for transport, _listener in self.members:
            if not transport.is_disconnected:
                transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        for transport, _listener in self.members:
            if not transport.is_disconnected:
                transport.underlying_transport.resume_reading()

    def collect(self, seq: int, run: FanoutRun) -> None:
        """Read broadcast `seq` off every paused member; record its kernel receive time."""
        offset = realtime_offset_ns()
        for transport, listener in self.members:
            if transport.is_disconnected:
                continue
            try:
                with socket.socket(fileno=os.dup(self.fd(transport))) as sock:
                    stamp = self.read_frame(sock, seq)
            except NotReceived as missing:
                self.problems[str(missing)] = self.problems.get(str(missing), 0) + 1
                continue
            listener.expected = seq + 1  # consumed here: picows must not wait for it
            run.delivered(seq, stamp - offset)

    def read_frame(self, sock: socket.socket, seq: int) -> int:
        """The CLOCK_REALTIME ns at which the kernel received the data frame of `seq`.

        The descriptor is non-blocking (its flags are the transport's), so a frame that is not
        there is EAGAIN, never a wait. Control frames before it are skipped (the server runs
        without pings in this mode, so there should be none)."""
        try:
            for _ in range(8):
                head = sock.recv(2, socket.MSG_PEEK)
                if len(head) < 2:
                    raise NotReceived("connection closed" if not head else "partial frame")
                opcode, length = head[0] & 0x0F, head[1] & 0x7F
                if opcode == 0x8 or (opcode > 0x8 and length > 125):
                    raise NotReceived("close frame")
                if opcode > 0x8:
                    self.read_exactly(sock, 2 + length)
                    continue
                data, stamp = self.read_exactly(sock, len(self.header) + self.size)
                if not data.startswith(self.header):
                    raise NotReceived("unexpected frame")
                if stamp is None:
                    raise NotReceived("no timestamp")
                if SEQ_STAMP.unpack_from(data, len(self.header))[0] != seq:
                    raise NotReceived("another broadcast")
                return stamp
        except BlockingIOError:
            raise NotReceived("nothing to read") from None
        except OSError as exc:
            raise NotReceived(type(exc).__name__) from None
        raise NotReceived("control frames only")

    @staticmethod
    def read_exactly(sock: socket.socket, size: int) -> tuple[bytes, int | None]:
        """`size` bytes and the receive timestamp of the last of them (None if not stamped)."""
        data = b""
        stamp = None
        while len(data) < size:
            chunk, ancillary, _flags, _addr = sock.recvmsg(size - len(data), CMSG_SPACE)
            if not chunk:
                raise NotReceived("partial frame")
            data += chunk
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack_from(raw)
                    stamp = sec * 1_000_000_000 + nsec
        return data, stamp


class NotReceived(Exception):
    """A member whose broadcast could not be read with a receive timestamp (and why)."""


CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)


def realtime_offset_ns(samples: int = 5) -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in ns: of a few readings, the one bracketed most
    tightly by two monotonic readings."""
    best: tuple[int, int] | None = None
    for _ in range(samples):
        before = monotonic_ns()
        real = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, real - (before + after) // 2)
    assert best is not None
    return best[1]


def fanout_payload(seq: int, size: int) -> bytes:
    """A broadcast: sequence number and send time (CLOCK_MONOTONIC ns), padded to `size`."""
    return SEQ_STAMP.pack(seq, monotonic_ns()).ljust(size, b"x")


class StdinLines:
    """Lines from stdin without blocking the loop; None at EOF."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.buffer = b""
        self.eof = False
        self.fd = sys.stdin.fileno()
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        data = os.read(self.fd, 4096)
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.eof = True
            self.queue.put_nowait(None)
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.queue.put_nowait(line.decode().strip())

    async def next(self, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


async def fanout_main(args: argparse.Namespace) -> dict[str, Any]:
    """Open `count` members of one channel, then broadcast on command (several of these
    processes can share a channel; the script that runs them sends the commands):

        OPEN {...}  printed once every connection is open (or failed, or timed out)
        PAUSE       (with --arrival kernel) stop reading on every member; prints PAUSED {}
        SEND <seq>  the first connection sends broadcast <seq>; prints SENT {"seq", "sent_ns"}
        WAIT <seq> <seconds>  wait until every open connection has <seq> (bounded); prints
                    GOT {"seq", "received", "expected", "first_ns", "last_ns",
                         "percentiles_ns"}  (receipt times at percentiles 0..100)
        EOF         close everything, print RESULT

    With --arrival kernel, WAIT sleeps --defer seconds, then reads <seq> off every paused
    member with its kernel receive timestamp (see KernelArrival) and resumes reading; the
    first/last times are then when the frames reached the members' sockets.
    """
    if args.size < SEQ_STAMP.size:
        raise SystemExit(f"load: --size must be at least {SEQ_STAMP.size}")
    hold_limit(args.count)
    run = FanoutRun()
    url = f"ws://{args.host}:{args.port}{args.path}/{args.channel}"
    start_ns = monotonic_ns()
    sockets = procs.source_socket_factory(args.count, args.per_address, args.first_address)
    results = await connect_many(
        url,
        lambda _i: FanoutReceiver(run),
        args.count,
        concurrency=args.concurrency,
        timeout=args.connect_timeout,
        socket_factory=sockets,
        read_buffer=1024,
    )
    end_ns = monotonic_ns()
    members = [r for r in results if not isinstance(r, BaseException)]
    transports = [transport for transport, _listener in members]
    errors = error_counts(results)
    arrival = KernelArrival(members, args.size) if args.arrival == "kernel" else None
    if arrival is not None:
        arrival.enable_timestamps()
        await asyncio.sleep(0.5)
    emit(
        "OPEN",
        {
            "opened": len(transports),
            "failed": len(results) - len(transports),
            "errors": errors,
            "connect_s": (end_ns - start_ns) / 1e9,
            "start_ns": start_ns,
            "end_ns": end_ns,
        },
    )
    log(f"{len(transports)} members of {args.channel} open in {(end_ns - start_ns) / 1e9:.1f}s")

    commands = StdinLines()
    deadline = time.monotonic() + args.hold
    released = False
    while time.monotonic() < deadline:
        line = await commands.next(max(0.0, deadline - time.monotonic()))
        if line is None:
            released = commands.eof
            break
        verb, *rest = line.split()
        if verb == "PAUSE":
            if arrival is not None:
                arrival.pause()
            emit("PAUSED", {})
        elif verb == "SEND" and transports:
            seq = int(rest[0])
            payload = fanout_payload(seq, args.size)
            transports[0].send(BINARY, payload)
            emit("SENT", {"seq": seq, "sent_ns": SEQ_STAMP.unpack_from(payload)[1]})
        elif verb == "WAIT":
            seq, timeout = int(rest[0]), min(float(rest[1]), args.hold)

            def open_count() -> int:
                return len(transports) - run.disconnects

            def complete(seq: int = seq) -> bool:
                return run.seen.get(seq, [0])[0] >= open_count()

            if arrival is None:
                await wait_until(complete, timeout, step=0.002)
            else:
                await asyncio.sleep(min(args.defer, timeout))
                arrival.collect(seq, run)
                arrival.resume()
            count, first, last = run.seen.get(seq, [0, 0, 0])
            emit(
                "GOT",
                {
                    "seq": seq,
                    "received": count,
                    "expected": open_count(),
                    "first_ns": first or None,
                    "last_ns": last or None,
                    "percentiles_ns": run.percentiles(seq),
                },
            )
    still_open = sum(1 for t in transports if not t.is_disconnected)
    for transport in transports:
        transport.disconnect()
    return {
        "opened": len(transports),
        "still_open_at_end": still_open,
        "repeated_or_reordered": run.repeats,
        "server_closes": run.server_closes,
        "released_by_stdin": released,
        "arrival": args.arrival,
        "not_received": arrival.problems if arrival is not None else {},
    }
