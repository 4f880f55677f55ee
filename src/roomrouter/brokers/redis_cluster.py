"""The Redis Cluster broker, at its historical import path: see
:mod:`roomrouter.brokers.redis.cluster`."""

from .redis import (
    RedisClusterBroker,
    cluster_recent_key,
    cluster_room_channel,
    split_seeds,
)

__all__ = ["RedisClusterBroker", "cluster_recent_key", "cluster_room_channel", "split_seeds"]
