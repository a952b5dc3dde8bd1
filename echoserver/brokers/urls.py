"""The broker URL grammar: which Redis URLs the brokers take, and the cluster URL's parts.

config validates `broker` with url_problem() and the cluster broker reads its seeds with
split_cluster_url(), so the two cannot disagree. A leaf: it imports nothing from the
package (config may import it; see the import contract in setup.cfg).
"""

from __future__ import annotations

from urllib.parse import urlsplit

REDIS_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis-cluster", "rediss-cluster")


def url_problem(url: str) -> str | None:
    """What is wrong with a Redis or Redis Cluster URL: None if nothing, "" if it is not
    such a URL at all, else a short reason."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in CLUSTER_SCHEMES:
        try:
            split_cluster_url(url)
        except ValueError as err:
            return str(err)
        return None
    if not sep or scheme not in REDIS_SCHEMES:
        return ""
    if scheme == "unix" and not rest.strip("/"):
        return "a unix:// URL needs a socket path"
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as err:
        return str(err)
    return None


def split_cluster_url(url: str) -> tuple[str, list[tuple[str, int]], str]:
    """The parts of a redis-cluster:// or rediss-cluster:// URL,
    ``[user[:password]@]host:port[,host:port...][/0][?option=value...]``: (the credentials
    with their "@", or ""; the seeds as (host, port); the query). ValueError says what is
    wrong. Validation and the cluster broker both read a URL through this.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError("a cluster URL starts with redis-cluster:// or rediss-cluster://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    userinfo, at, hosts = rest[:cut].rpartition("@")
    seeds = []
    for seed in hosts.split(","):
        host, colon, port = seed.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{seed!r} is not host:port")
        seeds.append((host.removeprefix("[").removesuffix("]"), int(port)))
    path, _, query = rest[cut:].partition("?")
    if path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only")
    return userinfo + at, seeds, query
