"""TLS: the server's SSL context from the settings, and SIGHUP's reload of the certificate
for new connections.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

import tornado.httpserver

from echoserver.config import Settings, describe, load_tls_identity
from echoserver.runtime.startup import StartupError

log = logging.getLogger("echoserver")


def ssl_context(
    settings: Settings, sources: Mapping[str, str] | None = None
) -> ssl.SSLContext | None:
    if not settings.tls.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = TLS_VERSIONS[settings.tls.min_version]
    context.set_alpn_protocols(["http/1.1"])  # the only protocol served
    # config has checked the files; this catches one changed since (a reload, a worker
    # started later), with the same rules and messages.
    problem = load_tls_identity(context, settings.tls.certfile, settings.tls.keyfile)
    if problem is not None:
        cert = describe(settings, "tls.certfile", sources)
        key = describe(settings, "tls.keyfile", sources)
        raise StartupError(f"cannot load TLS files: {cert}, {key}: {problem[0]} {problem[1]}")
    return context


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def reload_tls(server: tornado.httpserver.HTTPServer, settings: Settings) -> None:
    """SIGHUP: load certfile/keyfile again (a renewed certificate) for new connections.

    Open connections keep the certificate they were made with. A file that does not load
    is logged and the current certificate kept: never a crash, never a port without TLS.
    """
    if not settings.tls.certfile:
        log.info("SIGHUP: no TLS configured, nothing to reload")
        return
    try:
        context = ssl_context(settings)
    except StartupError as error:
        log.error("SIGHUP: keeping the current certificate: %s", error)
        return
    server.ssl_options = context  # read for every new connection
    log.info("SIGHUP: reloaded the TLS certificate from %s", settings.tls.certfile)
