"""Where the shared store's Redis is, and the one client that talks to it.

Four forms, chosen by the URL's scheme (or by the explicit settings, ``RESILIENCE_REDIS``):

=============================  ==================================================================
``redis://host:port/db``       one server (``unix:///path.sock?db=0`` for a socket)
``rediss://host:port/db``      one server over TLS; ``?ssl_ca_certs=/path/ca.pem`` names the CA
``redis+sentinel://h:p,h:p/service[/db]``
                               the primary that the sentinels name for ``service``; a failover is
                               followed (the next connection asks the sentinels again)
``redis+cluster://h:p,h:p``    a Redis Cluster, from any of these seed nodes
=============================  ==================================================================

``rediss+sentinel://`` and ``rediss+cluster://`` are the same over TLS (to the sentinels too).
A password in the URL (``redis+sentinel://:secret@...``) is the data servers'; the sentinels'
own is ``?sentinel_password=``. TLS options in the query: ``ssl_ca_certs`` (a CA bundle file),
``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``), ``ssl_check_hostname``.

Every client is built with bounded connect and socket timeouts and **no retries of its own**:
one round trip to a slow or absent Redis costs at most the connect timeout plus the socket
timeout (a Cluster's topology refresh after an error at most one more socket timeout), then the
store goes on with per-process state and tries Redis again after its retry interval
(redis_link.RedisLink). A library retrying with backoff would hold the caller for seconds.

A Cluster client is built on first use, not here: a process starting while the cluster is away
still starts (per-process state), and connects when the cluster answers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Encoder
from redis.retry import Retry
from redis.sentinel import Sentinel

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"

SCHEMES = {
    "redis": (SINGLE, False), "rediss": (SINGLE, True), "unix": (SINGLE, False),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
}
# The explicit form's keys (RESILIENCE_REDIS): the URL's parts by name.
EXPLICIT_KEYS = ("sentinels", "service_name", "cluster_nodes", "db", "username", "password",
                 "sentinel_password", "tls", "ca_certs")
_CERT_REQS = ("required", "optional", "none")
_TLS_QUERY = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname")

DEFAULT_CONNECT_TIMEOUT_S = 0.25
DEFAULT_SOCKET_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class RedisTarget:
    """Where the shared store's Redis is: one server, a Sentinel service or a Cluster."""

    form: str  # SINGLE, SENTINEL or CLUSTER
    url: str = ""  # SINGLE: the URL, which redis-py reads itself
    nodes: tuple[tuple[str, int], ...] = ()  # SENTINEL: the sentinels; CLUSTER: the seed nodes
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_options: tuple[tuple[str, object], ...] = ()  # ssl_ca_certs, ssl_cert_reqs, ssl_check_hostname

    def describe(self) -> str:
        """The target without its secrets, for logs and the console."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.nodes)
        tls = "s" if self.tls else ""
        if self.form == SENTINEL:
            return f"redis{tls}+sentinel://{nodes}/{self.service_name}/{self.db}"
        if self.form == CLUSTER:
            return f"redis{tls}+cluster://{nodes}"
        parts = urlsplit(self.url)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def parse_url(url: str) -> RedisTarget:
    """The target a URL names; ValueError saying what is wrong with it."""
    scheme, _, rest = url.partition("://")
    if not rest or scheme.lower() not in SCHEMES:
        raise ValueError(f"must start with {', '.join(s + '://' for s in SCHEMES)}; got {url!r}.")
    form, tls = SCHEMES[scheme.lower()]
    query = {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}
    tls_options = _tls_options(query, tls)
    if form == SINGLE:
        try:
            redis.connection.parse_url(url) if scheme.lower() != "unix" else None
        except ValueError as exc:
            raise ValueError(f"is not a Redis URL: {exc}") from None
        return RedisTarget(SINGLE, url=url, tls=tls, tls_options=tls_options)
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    nodes = nodes_of(hosts.split(","), url)
    segments = [segment for segment in path.split("/") if segment]
    if form == SENTINEL:
        if not segments:
            raise ValueError(f"names no service: redis+sentinel://host:port,host:port/service[/db]; got {url!r}.")
        service, db = segments[0], segments[1] if len(segments) > 1 else query.get("db", "0")
    else:
        service, db = "", segments[0] if segments else "0"
    db = _db(db, url)
    if form == CLUSTER and db != 0:
        raise ValueError(f"names database {db}: a Redis Cluster has only database 0; got {url!r}.")
    return RedisTarget(form, nodes=nodes, service_name=unquote(service), db=db,
                       username=unquote(username) or None, password=unquote(password) or None,
                       sentinel_password=query.get("sentinel_password"), tls=tls, tls_options=tls_options)


def from_explicit(config: dict) -> RedisTarget:
    """The target the explicit settings describe (a dict of EXPLICIT_KEYS); ValueError naming a bad key."""
    unknown = sorted(str(key) for key in config if key not in EXPLICIT_KEYS)
    if unknown:
        raise ValueError(f"['{unknown[0]}'] is not a key of the explicit form; the keys are {', '.join(EXPLICIT_KEYS)}.")
    sentinels, cluster_nodes = config.get("sentinels"), config.get("cluster_nodes")
    if bool(sentinels) == bool(cluster_nodes):
        raise ValueError("must name either 'sentinels' (with 'service_name') or 'cluster_nodes', "
                         "lists of 'host:port'; one server is a URL (RESILIENCE_REDIS_URL).")
    where = "sentinels" if sentinels else "cluster_nodes"
    listed = sentinels or cluster_nodes
    if not isinstance(listed, (list, tuple)) or not all(isinstance(node, str) for node in listed):
        raise ValueError(f"['{where}'] must be a list of 'host:port'; got {listed!r}.")
    service = config.get("service_name", "")
    if sentinels and (not isinstance(service, str) or not service):
        raise ValueError("['service_name'] is required with 'sentinels': the name the sentinels monitor.")
    tls = config.get("tls", bool(config.get("ca_certs")))
    if not isinstance(tls, bool):
        raise ValueError(f"['tls'] must be true or false; got {tls!r}.")
    for key in ("username", "password", "sentinel_password", "ca_certs"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ValueError(f"['{key}'] must be a string; got {type(config[key]).__name__}.")
    db = config.get("db", 0)
    if isinstance(db, bool) or not isinstance(db, int) or db < 0 or (cluster_nodes and db != 0):
        raise ValueError(f"['db'] must be a database number (0 on a Cluster); got {db!r}.")
    tls_options = (("ssl_ca_certs", config["ca_certs"]),) if config.get("ca_certs") else ()
    return RedisTarget(SENTINEL if sentinels else CLUSTER, nodes=nodes_of(listed, where), service_name=service,
                       db=db, username=config.get("username") or None, password=config.get("password") or None,
                       sentinel_password=config.get("sentinel_password") or None, tls=tls, tls_options=tls_options)


def nodes_of(addresses, where) -> tuple[tuple[str, int], ...]:
    nodes = []
    for address in addresses:
        host, _, port = address.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"names {address!r} in {where!r}, which is not host:port.")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError(f"names no host:port in {where!r}.")
    return tuple(nodes)


def _db(value: str, url: str) -> int:
    if not str(value).isdigit():
        raise ValueError(f"names database {value!r}, which is not a number; got {url!r}.")
    return int(value)


def _tls_options(query: dict, tls: bool) -> tuple[tuple[str, object], ...]:
    options = []
    for name in _TLS_QUERY:
        if name not in query:
            continue
        if not tls:
            raise ValueError(f"sets {name} on a plain connection: TLS is rediss:// (rediss+sentinel://, "
                             f"rediss+cluster://).")
        value = query[name]
        if name == "ssl_cert_reqs" and value not in _CERT_REQS:
            raise ValueError(f"sets ssl_cert_reqs={value!r}; it is one of {', '.join(_CERT_REQS)}.")
        if name == "ssl_check_hostname":
            value = value.lower() in ("1", "true", "yes")
        options.append((name, value))
    return tuple(options)


# -- the client ---------------------------------------------------------------------------------


def connect(target: RedisTarget, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S):
    """The one client of ``target``: redis.Redis (one server, or the Sentinel service's primary)
    or a Cluster client, each with bounded timeouts and no retries of its own."""
    bounded = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": socket_timeout_s,
               "retry": Retry(NoBackoff(), 0), **dict(target.tls_options)}
    if target.form == SINGLE:
        return redis.Redis.from_url(target.url, **bounded)
    auth = {"username": target.username, "password": target.password}
    if target.tls:
        bounded["ssl"] = True
    if target.form == SENTINEL:
        sentinel_kwargs = {**bounded, "password": target.sentinel_password}
        sentinels = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **bounded)
        return sentinels.master_for(target.service_name, db=target.db, **auth, **bounded)
    return LazyCluster([ClusterNode(host, port) for host, port in target.nodes], **auth, **bounded)


class LazyCluster:
    """A RedisCluster built on first use (it reads the topology when built, which needs the cluster).

    Building it while no seed node answers raises redis.exceptions.ConnectionError, which the
    store treats as any outage; the next use tries again.
    """

    def __init__(self, startup_nodes: list[ClusterNode], **kwargs) -> None:
        self._startup_nodes = startup_nodes
        self._kwargs = kwargs
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> RedisCluster:
        cluster = self._cluster
        if cluster is None:
            with self._lock:
                if self._cluster is None:
                    try:
                        self._cluster = RedisCluster(startup_nodes=self._startup_nodes,
                                                     require_full_coverage=False, **self._kwargs)
                    except redis.exceptions.RedisClusterException as exc:
                        raise redis.exceptions.ConnectionError(f"Redis Cluster not reachable: {exc}") from exc
                cluster = self._cluster
        return cluster

    def register_script(self, script) -> Script:
        return Script(self, script)  # its SHA is computed here; the script is sent on first use

    def get_encoder(self) -> Encoder:
        return Encoder("utf-8", "strict", False)  # a cluster's default, without building it

    def pipeline(self, transaction=None, shard_hint=None) -> "SlotPipeline":
        return SlotPipeline(self.cluster.pipeline(transaction=transaction, shard_hint=shard_hint))

    def __getattr__(self, name):
        return getattr(self.cluster, name)


class SlotPipeline:
    """A Cluster pipeline that also queues MGET, which redis-py refuses in one (it cannot split
    it across slots): the store's MGETs read one integration's counters, one slot."""

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline

    def mget(self, *keys):
        return self._pipeline.execute_command("MGET", *keys)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)
