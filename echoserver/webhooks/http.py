"""The one place the webhook sender touches HTTP: a POST through Tornado's
AsyncHTTPClient (the server already depends on Tornado, whose client verifies TLS
certificates and enforces a total deadline), returning the status code.

The sender (sender.py) only sees the `Post` signature, so it needs no Tornado.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import tornado.httpclient

from echoserver import __version__

# url, headers, body, timeout in seconds -> status; raises on a failure with no status.
Post = Callable[[str, dict[str, str], bytes, float], Awaitable[int]]


def tornado_post() -> Post:
    """A Post on a client of our own (not the IOLoop's shared one), one request at a time."""
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=1)

    async def post(url: str, headers: dict[str, str], body: bytes, timeout: float) -> int:
        request = tornado.httpclient.HTTPRequest(
            url,
            method="POST",
            headers={**headers, "User-Agent": f"echoserver/{__version__}"},
            body=body,
            connect_timeout=timeout,
            request_timeout=timeout,
            follow_redirects=False,
        )
        response = await client.fetch(request, raise_error=False)
        if response.code == 599:  # Tornado's code for no HTTP answer (timeout, refused)
            raise response.error or ConnectionError("no answer")
        return response.code

    return post
