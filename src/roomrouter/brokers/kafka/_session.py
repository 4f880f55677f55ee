"""One connection epoch of a Kafka node: its clients, opened together and replaced wholesale
after a failure, and the marker records that say where reading starts (see "Where a newly
subscribed room starts" in the package docstring)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ..._errors import BrokerUnavailable, ConfigurationError, describe
from ._common import quiet_stop, retrieve

__all__ = ["Session", "close_session", "mark", "new_clients"]


@dataclass(slots=True, eq=False)
class Session:
    """The clients of one connection epoch."""

    producer: Any
    consumer: Any
    partitions: int  # of the data topic, as the broker reports it
    control_tp: TopicPartition
    # Opened on first use by recent(): a second, group-less consumer that scans a partition
    # backwards without disturbing the live reader's positions, and an admin client that reads
    # the storage group's committed offsets.
    history: Any = None
    admin: Any = None


def new_clients(
    options: dict[str, Any], *, acks: str | int, linger_ms: int, fetch_max_wait_ms: int
) -> tuple[Any, Any]:
    """A node's producer and its group-less live consumer, not started yet."""
    try:
        producer = AIOKafkaProducer(
            acks=acks,
            linger_ms=linger_ms,
            enable_idempotence=False,  # Tansu refuses idempotent and transactional producers
            **options,
        )
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            # Never let the client pick a position: it is always set by a seek (see the
            # package docstring).
            auto_offset_reset="none",
            fetch_max_wait_ms=fetch_max_wait_ms,
            isolation_level="read_uncommitted",
            **options,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"bad Kafka client options: {exc}") from exc
    return producer, consumer


async def mark(producer: Any, targets: Mapping[int, tuple[str, bytes | None]]) -> dict[int, int]:
    """Append an empty marker record to each partition of ``targets`` (partition -> (topic,
    key)), acknowledged; return partition -> the marker's offset."""
    futures: dict[int, asyncio.Future[Any]] = {}
    try:
        for p, (topic, key) in targets.items():
            futures[p] = await producer.send(topic, b"", key=key, partition=p)
        results = await asyncio.gather(*futures.values(), return_exceptions=True)
    except BaseException:
        for future in futures.values():
            future.add_done_callback(retrieve)
        raise
    offsets = {}
    for p, result in zip(futures, results, strict=True):
        if isinstance(result, BaseException):
            raise BrokerUnavailable(f"Kafka marker write failed: {describe(result)}") from result
        offsets[p] = result.offset
    return offsets


async def close_session(session: Session, limit: float) -> None:
    """Stop the session's clients, within ``limit`` seconds, shielded from cancellation."""
    with anyio.move_on_after(limit, shield=True):
        await quiet_stop(session.consumer, session.producer, session.history, session.admin)
