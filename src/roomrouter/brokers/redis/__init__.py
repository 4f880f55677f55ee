"""The Redis backends: :class:`RedisBroker` (``redis://``, one server) and
:class:`RedisClusterBroker` (``redis://...?cluster=1``), which share one pipelined publisher
built on the transport core (:mod:`roomrouter.brokers.transport`: a single server is one lane,
a cluster has a lane per shard master), one subscriber connection type, history reads on
connections of their own and one storage consumer; and the names and URL helpers that the
Redis presence store (:mod:`roomrouter.presence.redis`) shares with them.

Names. Every channel and key of a namespace starts with ``rr:{<ns>}:`` (:func:`key_prefix`),
where ``<ns>`` is the namespace with ``%``, ``:``, ``{`` and ``}`` percent-encoded (``%25``,
``%3A``, ``%7B``, ``%7D``). So the namespace part never holds the separator and always ends at
the first ``:``, and no two namespaces share a name whatever rooms and nodes they have. The
braces are a Redis Cluster *hash tag*: every key of a namespace hashes to one slot, as the
MULTI of a persisted publish (storage stream, recent stream, publish) requires there. A
cluster's room channels and recent caches take the room as their hash tag instead
(:func:`cluster_room_channel`, :func:`cluster_recent_key`), so rooms spread over the shards.

Layout::

    redis/
      broker.py       RedisBroker
      cluster.py      RedisClusterBroker (also at roomrouter.brokers.redis_cluster)
      _pipeline.py    Lane: the publisher connection of one server, on an Outbox
      _subscriber.py  Subscriber: one pub/sub connection, (un)subscribe batches it confirms
      _history.py     history reads on connections of their own
      _storage.py     the storage consumer (consumer group on the storage stream)
      _common.py      names, URL options, RESP packing, connecting
"""

from ._common import (
    URL_OPTIONS,
    cluster_recent_key,
    cluster_room_channel,
    glob_escape,
    key_prefix,
    parse_redis_url,
    split_seeds,
    store_key,
    url_flag,
)
from .broker import RedisBroker
from .cluster import RedisClusterBroker

__all__ = [
    "URL_OPTIONS",
    "RedisBroker",
    "RedisClusterBroker",
    "cluster_recent_key",
    "cluster_room_channel",
    "glob_escape",
    "key_prefix",
    "parse_redis_url",
    "split_seeds",
    "store_key",
    "url_flag",
]
