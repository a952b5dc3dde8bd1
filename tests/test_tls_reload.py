"""Certificates that renew: SIGHUP reloads tls.certfile/keyfile for new connections, open
connections are untouched, and a file that does not load keeps the current certificate.
Also tls.min_version and ALPN. On both event loops, and with worker processes.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from websockets.sync.client import connect

from tests.certs import make_certificate
from tests.conftest import wait_until
from tests.servers import ServerProcess

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def insecure_context(**options: Any) -> ssl.SSLContext:
    """A client context that accepts any certificate: the tests look at which one it is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        setattr(context, name, value)
    return context


def served_serial(port: int) -> int:
    """The serial number of the certificate a new TLS connection gets."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        insecure_context().wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path]:
    """The paths the server is configured with (what an ACME client replaces)."""
    return tmp_path / "live.crt", tmp_path / "live.key"


def install(certificate: tuple[Path, Path, int], live: tuple[Path, Path]) -> None:
    shutil.copyfile(certificate[0], live[0])
    shutil.copyfile(certificate[1], live[1])


def start(run_server: Any, live: tuple[Path, Path], *args: str) -> ServerProcess:
    return run_server("--tls-certfile", str(live[0]), "--tls-keyfile", str(live[1]), *args)


@LOOPS
def test_sighup_serves_the_renewed_certificate_to_new_clients_only(
    run_server: Any, tmp_path: Path, live: tuple[Path, Path], loop: str
) -> None:
    old, new = make_certificate(tmp_path, "old"), make_certificate(tmp_path, "new")
    install(old, live)
    server = start(run_server, live, "--loop", loop)
    assert served_serial(server.port) == old[2]
    with connect(server.ws_url + "/ws", ssl=insecure_context(), open_timeout=10) as client:
        client.send("before")
        assert client.recv(timeout=5) == "before"
        install(new, live)
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded the TLS certificate" in server.log(), 10)
        assert served_serial(server.port) == new[2]
        client.send("after")  # the open connection is untouched
        assert client.recv(timeout=5) == "after"
    assert server.proc.poll() is None


@LOOPS
def test_a_certificate_that_does_not_load_keeps_the_current_one(
    run_server: Any, tmp_path: Path, live: tuple[Path, Path], loop: str
) -> None:
    old = make_certificate(tmp_path, "old")
    install(old, live)
    server = start(run_server, live, "--loop", loop)
    live[0].write_text("not a certificate\n")
    server.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "keeping the current certificate" in server.log(), 10)
    assert served_serial(server.port) == old[2]  # still TLS, still the old certificate
    other = make_certificate(tmp_path, "other")
    shutil.copyfile(other[0], live[0])  # a certificate that does not match the key
    server.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: server.log().count("keeping the current certificate") == 2, 10)
    assert served_serial(server.port) == old[2]
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_every_worker_reloads(run_server: Any, tmp_path: Path, live: tuple[Path, Path]) -> None:
    old, new = make_certificate(tmp_path, "old"), make_certificate(tmp_path, "new")
    install(old, live)
    server = start(run_server, live, "--processes", "2")
    assert wait_until(lambda: server.log().count(" page https://") == 2, 10)  # both serving
    install(new, live)
    server.proc.send_signal(signal.SIGHUP)  # to the supervisor, which forwards it
    assert wait_until(lambda: server.log().count("reloaded the TLS certificate") == 2, 10)
    # New connections land on either worker: every one gets the new certificate.
    assert {served_serial(server.port) for _ in range(20)} == {new[2]}


def test_min_version_and_alpn(run_server: Any, tmp_path: Path, live: tuple[Path, Path]) -> None:
    install(make_certificate(tmp_path, "c"), live)
    default = start(run_server, live)
    only_13 = start(run_server, live, "--tls-min-version", "1.3")
    tls12 = insecure_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with connect(default.ws_url + "/ws", ssl=tls12, open_timeout=10) as client:
        client.send("1.2 is the default minimum")
        assert client.recv(timeout=5) == "1.2 is the default minimum"
    with pytest.raises(ssl.SSLError):
        connect(only_13.ws_url + "/ws", ssl=tls12, open_timeout=10)
    alpn = insecure_context()
    alpn.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", only_13.port), timeout=5) as raw,
        alpn.wrap_socket(raw) as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"
