"""A real Redis Cluster failover to a replica that missed the last publishes.

The replica is stopped (SIGSTOP) and its link cut while three more messages are
published, then its primary is killed and the replica resumed: it is promoted holding the
channel's counter three behind and the same epoch. A server that delivered those offsets
sees them issued again and gives the channel a new epoch, so a client that resumes from the
lost offsets is told `recovered:false` with the new epoch, never replayed the new messages
as if they were its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest

from tests.conftest import eventually, run
from tests.redis_cluster import LocalCluster, own_redis_cluster
from tests.redis_server import RedisServer
from tests.test_cluster import _status, read
from tests.test_redis_cluster import NAMES

__all__ = ["own_redis_cluster"]

pytestmark = pytest.mark.redis


def replica_of(cluster: LocalCluster, primary: RedisServer) -> RedisServer:
    for node in cluster.running():
        with cluster.client(node) as client:
            role = client.execute_command("ROLE")
        if role[0] == b"slave" and int(role[2]) == primary.port:
            return node
    raise AssertionError(f"no replica of {primary.address}")


def test_a_replica_promoted_without_the_last_publishes_gets_a_new_epoch(
    run_server: Any, own_redis_cluster: LocalCluster
) -> None:
    from tornado.websocket import websocket_connect

    cluster = own_redis_cluster
    primary = cluster.primary_of(NAMES.pubsub("room"))
    replica = replica_of(cluster, primary)
    server = run_server("--mode", "mixed", "--broker", cluster.url, "--history", "20")

    async def broadcast(client: Any, payload: str) -> dict[str, Any]:
        """Send one broadcast; the member's own copy (the broadcastResult follows it)."""
        await client.write_message(json.dumps({"type": "broadcast", "payload": payload}))
        while True:
            message = json.loads(await read(client, 30))
            if message["type"] == "broadcast":
                result = json.loads(await read(client, 30))
                assert result["type"] == "broadcastResult", result
                return dict(message)

    async def scenario() -> dict[str, Any]:
        client = await websocket_connect(f"{server.ws_url}/ws/room")
        kept = [await broadcast(client, f"kept{n}") for n in range(3)]
        with cluster.client(primary) as admin:  # the replica has these three
            assert admin.execute_command("WAIT", 1, 5000) == 1
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            # Cut the replication link, so that what follows cannot wait in the stopped
            # replica's socket buffer; stopped, the replica cannot connect again.
            with cluster.client(primary) as admin:
                assert admin.execute_command("CLIENT", "KILL", "TYPE", "replica") >= 1
            lost = [await broadcast(client, f"lost{n}") for n in range(3)]
            await asyncio.to_thread(cluster.kill, primary)
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(cluster.wait_ok, 60)  # the replica took over
        assert await eventually(lambda: _status(server, 200), 60)
        reissued = await broadcast(client, "reissued")
        after: dict[str, Any] = {}
        for n in range(50):  # bounded: the renewal lands within a few publishes
            after = await broadcast(client, f"after{n}")
            if after["epoch"] != kept[0]["epoch"]:
                break
        late = await websocket_connect(
            f"{server.ws_url}/ws/room?since={lost[-1]['offset']}&epoch={lost[-1]['epoch']}"
        )
        recovery = json.loads(await read(late, 30))
        client.close()
        late.close()
        return {
            "kept": kept,
            "lost": lost,
            "reissued": reissued,
            "after": after,
            "recovery": recovery,
            "log": server.log(),
        }

    got = run(scenario(), timeout=150)
    epoch = got["kept"][0]["epoch"]
    assert [m["offset"] for m in got["kept"] + got["lost"]] == [1, 2, 3, 4, 5, 6]
    assert {m["epoch"] for m in got["kept"] + got["lost"]} == {epoch}
    # What the promoted replica did: offset 4 again, under the epoch it had.
    assert (got["reissued"]["offset"], got["reissued"]["epoch"]) == (4, epoch)
    assert "the broker lost messages; giving the channel a new epoch" in got["log"]
    assert got["after"]["epoch"] != epoch
    recovery = got["recovery"]
    assert recovery["type"] == "recovery" and recovery["recovered"] is False
    assert recovery["epoch"] == got["after"]["epoch"]
