"""A real Redis Cluster for tests: six redis-server nodes on free loopback ports.

This module owns LocalCluster (three primaries with a replica each, made by
`redis-cli --cluster create`; stop and start it whole, kill one node) and its pytest
fixtures: `redis_cluster` is started once per test session, `clean_redis_cluster` hands it
to one test running and emptied. A small node timeout (1 s) lets a replica take over a
killed primary within seconds. Without redis-server (or redis-cli) the fixtures skip,
unless the CI environment variable is set: there a missing Redis is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.certs import make_certificate
from tests.redis_server import RedisServer, free_port, require_redis_server

REDIS_CLI = shutil.which("redis-cli")
NODE_TIMEOUT_MS = 1000


class LocalCluster:
    """Six cluster-enabled redis-servers without persistence, bound to 127.0.0.1."""

    def __init__(self, directory: Path, seeds: int = 3, tls: bool = False) -> None:
        self.directory = directory
        self.seeds = seeds
        self.nodes: list[RedisServer] = []
        self.created = False
        self.cafile: Path | None = None
        tls_args: tuple[str, ...] = ()
        context = None
        directory.mkdir(parents=True, exist_ok=True)
        if tls:
            # One self-signed CA certificate for 127.0.0.1 that every node presents and
            # trusts: clients, replication and the cluster bus all speak TLS.
            self.cafile, keyfile, _ = make_certificate(directory, "redis", ca=True)
            context = ssl.create_default_context(cafile=str(self.cafile))
            tls_args = ("--port", "0", "--tls-cert-file", str(self.cafile))
            tls_args += ("--tls-key-file", str(keyfile), "--tls-ca-cert-file", str(self.cafile))
            tls_args += ("--tls-auth-clients", "no", "--tls-cluster", "yes")
            tls_args += ("--tls-replication", "yes")
        for n in range(6):
            path = directory / f"node{n}"
            path.mkdir(parents=True, exist_ok=True)
            port = free_port()
            self.nodes.append(
                RedisServer(
                    path,
                    port,
                    (
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        # the bus port: free too (port + 10000, the default, may not be)
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        # a replica takes over however stale it is: the tests kill primaries
                        "--cluster-replica-validity-factor",
                        "0",
                        *tls_args,
                        *(("--tls-port", str(port)) if tls else ()),
                    ),
                    context,
                )
            )

    @property
    def url(self) -> str:
        """The broker URL: the first few nodes as seeds."""
        seeds = ",".join(node.address for node in self.nodes[: self.seeds])
        if self.cafile:
            return f"rediss-cluster://{seeds}?ssl_ca_certs={self.cafile}"
        return f"redis-cluster://{seeds}"

    @property
    def address(self) -> str:
        """The first seed, which a broker's health reason names."""
        return self.nodes[0].address

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start every node that is not running, create the cluster the first time, and
        wait until every node says it is ok."""
        for node in self.nodes:
            if node.proc is None:
                node.start()
        if not self.created:
            assert REDIS_CLI is not None
            addresses = [node.address for node in self.nodes]
            create = [REDIS_CLI, "--cluster", "create", *addresses]
            if self.cafile:
                create += ["--tls", "--cacert", str(self.cafile)]
            subprocess.run(
                [*create, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=timeout,
            )
            self.created = True
        self.wait_ok(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node: no goodbye to its clients or to the other nodes."""
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait()
        node.proc = None

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.proc is not None]

    def client(self, node: RedisServer) -> redis.Redis:
        if self.cafile:
            return redis.Redis(
                host="127.0.0.1",
                port=node.port,
                socket_timeout=5,
                ssl=True,
                ssl_ca_certs=str(self.cafile),
            )
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        found = []
        for node in self.running():
            with self.client(node) as client:
                if client.execute_command("ROLE")[0] == b"master":
                    found.append(node)
        return found

    def primary_of(self, key: str) -> RedisServer:
        """The node that serves the key's slot now, as the running nodes tell."""
        for node in self.running():
            with self.client(node) as client:
                slot = client.execute_command("CLUSTER", "KEYSLOT", key)
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == primary[1])
        raise AssertionError(f"no running node knows who serves {key!r}")

    def spread(self, pubsub_name: Callable[[str], str]) -> dict[int, str]:
        """One channel name per primary: {primary's port: channel}, by the channel's
        pub/sub name's slot."""
        node = self.running()[0]
        with self.client(node) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        found: dict[int, str] = {}
        for n in range(1000):
            channel = f"room{n}"
            slot = key_slot(pubsub_name(channel).encode())
            port = next(primary[1] for start, end, primary, *_ in ranges if start <= slot <= end)
            found.setdefault(port, channel)
            if len(found) == len(ranges):
                break
        return found

    def ok(self) -> bool:
        """Every running node says the cluster is ok, three primaries serve all slots and
        every replica is in sync with its primary."""
        try:
            primaries = 0
            for node in self.running():
                with self.client(node) as client:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                    role = client.execute_command("ROLE")
                    if role[0] == b"master":
                        primaries += 1
                    elif role[3] != b"connected":
                        return False
            return primaries == 3
        except (redis.RedisError, OSError):
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ok():
            if time.monotonic() > deadline:
                logs = "\n".join(node.log()[-2000:] for node in self.nodes)
                raise RuntimeError(f"the Redis Cluster did not become ok:\n{logs}")
            time.sleep(0.1)

    def flush(self) -> None:
        """Empty every primary and undo what a test may have configured."""
        for node in self.primaries():
            with self.client(node) as client:
                client.flushall()
                client.config_set("maxmemory", 0)


def require_redis_cluster_tools() -> None:
    require_redis_server()
    if REDIS_CLI is None:
        reason = "redis-cli is not installed (apt-get install redis-tools; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason + ", and CI is set: the Redis tests must run there")
        pytest.skip(reason)


def started_cluster(directory: Path, tls: bool = False) -> LocalCluster:
    """A new started cluster; tries again with other ports if one was taken meanwhile."""
    for attempt in range(3):
        cluster = LocalCluster(directory / f"cluster{attempt}", tls=tls)
        try:
            return cluster.start()
        except BaseException as error:
            cluster.stop()  # whatever went wrong, no node is left behind
            if attempt == 2 or not isinstance(error, (RuntimeError, subprocess.SubprocessError)):
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def running_cluster(directory: Path, tls: bool = False) -> Iterator[LocalCluster]:
    """A started cluster, stopped (every node) on the way out; skips without the tools."""
    require_redis_cluster_tools()
    cluster = started_cluster(directory, tls)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for the whole session (making one takes seconds)."""
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def clean_redis_cluster(redis_cluster: LocalCluster) -> LocalCluster:
    """The session's cluster, running, ok and empty."""
    redis_cluster.start()
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster for one test that breaks it (kills a primary)."""
    with running_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def tls_redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster for one test that speaks only TLS (rediss-cluster://)."""
    with running_cluster(tmp_path, tls=True) as cluster:
        yield cluster
