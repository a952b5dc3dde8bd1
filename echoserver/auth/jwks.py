"""A JWKS fetched from a URL: its keys by kid, fetched at start and again when a token names
a kid it does not have, at most once a minute, in a thread so the event loop never waits on
the network. A failed fetch keeps the keys already known and is logged without any key.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections.abc import Callable

from echoserver.config.jwt_keys import KeyProblem, VerifyKey, parse_jwks

log = logging.getLogger("echoserver.auth")

REFETCH_INTERVAL = 60.0  # seconds between fetches an unknown kid may set off
FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1 << 20


class RemoteJwks:
    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.keys: list[VerifyKey] = []
        self._clock = clock
        self._fetched_at = -math.inf
        self._pending: asyncio.Future[None] | None = None
        self.fetches = 0  # completed attempts, for tests and logs

    def due(self) -> bool:
        """Whether an unknown kid may fetch the document again now."""
        return self._clock() - self._fetched_at >= REFETCH_INTERVAL

    async def refresh(self) -> None:
        """Fetch the document unless it was fetched in the last minute; concurrent callers
        share one fetch."""
        pending = self._pending
        if pending is not None:
            await asyncio.shield(pending)
            return
        if not self.due():
            return
        self._fetched_at = self._clock()
        loop = asyncio.get_running_loop()
        self._pending = pending = loop.create_future()
        try:
            data = await loop.run_in_executor(None, self._download)
            keys = parse_jwks(data)
        except (OSError, KeyProblem, ValueError) as err:
            log.warning(
                "auth.jwks: could not fetch %s: %s; keeping %d known keys",
                self.url,
                err,
                len(self.keys),
            )
        else:
            log.info("auth.jwks: fetched %d keys from %s", len(keys), self.url)
            self.keys = keys
        finally:
            self.fetches += 1
            self._pending = None
            pending.set_result(None)

    def _download(self) -> bytes:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:
            data: bytes = response.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"the document is over {MAX_DOCUMENT_BYTES} bytes")
        return data
