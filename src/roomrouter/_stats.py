"""Counters a router keeps; :meth:`RoomRouter.stats` returns a snapshot."""

from __future__ import annotations

import dataclasses

__all__ = ["Stats"]


@dataclasses.dataclass(slots=True)
class Stats:
    """Plain integer counters, bumped on the event loop (no locking needed).

    ``broker_publishes`` counts publishes sent live through the broker; ``bypassed_publishes``
    those served locally with no live broker publish (a persisted one still goes to the
    storage queue, counted in ``persisted``); ``broker_received`` every data frame the
    broker delivered to this node (before echo and room filtering).
    """

    published: int = 0
    persisted: int = 0
    broker_publishes: int = 0
    bypassed_publishes: int = 0
    broker_received: int = 0
    #: Live publishes sent to the remote hosts' own channels (``direct_max``), not the room's.
    direct_publishes: int = 0
    #: Of ``broker_received``, the frames that came on this node's own channel.
    direct_received: int = 0
    local_deliveries: int = 0
    remote_deliveries: int = 0
    dropped_echo: int = 0
    dropped_not_hosted: int = 0
    dropped_decode: int = 0
    #: Envelopes whose ``room`` is not the room whose channel they arrived on (forged or
    #: foreign): never delivered, since the channel is what the node subscribed to.
    dropped_room_mismatch: int = 0
    dropped_overflow: int = 0
    #: Live envelopes a member had already received from history (a recovery overlap).
    dropped_duplicate: int = 0
    members_disconnected: int = 0
    subscribe_batches: int = 0
    unsubscribe_batches: int = 0
    subscribe_failures: int = 0
    control_sent: int = 0
    control_received: int = 0
    control_send_errors: int = 0
    dropped_control_decode: int = 0
    dropped_control_overflow: int = 0
    barrier_timeouts: int = 0
    #: Host frames sent again to a peer that said Hello while a join waited for its Ack.
    barrier_resends: int = 0
    #: Full states asked of a peer whose frames this node missed, or first heard mid-stream.
    syncs_requested: int = 0
    #: Starts that gave up waiting for some node's State (a silent node, or a subscriber of
    #: the control channel that is no node, such as a monitor).
    discovery_timeouts: int = 0
    #: Nodes a barrier stopped waiting for because they had been silent for the suspect
    #: interval (a crashed peer), and States sent to such a node (or one that said Bye) when
    #: it was heard again.
    barrier_suspects: int = 0
    owed_states: int = 0
    #: Times this node resynchronised its view after its own silence (a loop that ran late
    #: past the suspect interval's slack, a lost broker connection).
    resyncs: int = 0
    #: Control frames without a valid HMAC tag (a ``control_secret`` is set): dropped.
    dropped_control_auth: int = 0
    nodes_expired: int = 0
    reconnects: int = 0
    #: Envelopes delivered from a room's recent cache after a reconnect (missed while the data
    #: connection was down), counted per member; and rooms whose members were told of a gap
    #: (:class:`~roomrouter.DeliveryGap`), once per room and reconnect.
    recovered_after_reconnect: int = 0
    delivery_gaps: int = 0
    #: Presence writes applied, failed attempts (retried), and writes dropped (queue full).
    presence_writes: int = 0
    presence_errors: int = 0
    presence_dropped: int = 0
    task_restarts: int = 0
    #: Recent-cache entries skipped by history reads because they hold no envelope (written
    #: by something other than a roomrouter node).
    dropped_recent_garbage: int = 0

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)
