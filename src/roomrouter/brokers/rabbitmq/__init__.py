"""RabbitMQ broker: one topic exchange per namespace, one exclusive queue per node, bound per room.

Exchanges (durable, declared by every node): ``rr.{ns}.data`` (topic) carries room frames
with the room's *routing key*; ``rr.{ns}.control`` (fanout) carries control broadcasts;
``rr.{ns}.direct`` (direct) carries control frames to one node, keyed by node id. Each node
declares one exclusive, auto-delete queue, binds it to the control and direct exchanges, and
binds/unbinds it on the data exchange per room: dynamic subscription is RabbitMQ's own routing,
and ``broker_subscriptions`` reads the bindings back through the management HTTP API. All data
for a node, whichever key brought it, arrives through that one queue, in each publisher's
channel order.

Names (:func:`amqp_name`). Exchange and queue names are ``rr.`` and dot-separated parts: the
namespace, a kind (``data``, ``store``, ``node``, ...) and, for some, a node id or a room key.
Every part keeps ``A-Za-z0-9_-`` and writes any other byte of its UTF-8 as ``+`` and two hex
digits, so no part holds a ``.``, a namespace can never pose as another namespace plus a
kind, and every name uses only what AMQP clients accept in names. A name longer than the limit
(127 bytes for exchanges, 255 for queues) becomes ``rr.#`` + the hex SHA-256 of the long name
(``#`` never occurs in an encoded name).

Routing keys. A topic exchange reads ``.`` as a word separator and ``*``/``#`` as wildcards,
and keys are at most 255 bytes. A room's key is therefore one word: the unpadded base64url of
its UTF-8 name (alphabet ``A-Za-z0-9-_``), or, when that would exceed 200 bytes, ``~`` followed
by the hex SHA-256 of the name (``~`` is outside the base64url alphabet, so the two forms never
collide). Bindings are always exact keys, never patterns. The node maps the routing key a frame
arrived with back to the held room it was bound for, and hands that room to the router (which
drops an envelope claiming another room); a key it holds no room for (a frame still queued
from a room just unbound) is counted in :attr:`filtered`.

Direct publishing (``supports_direct``; docs/architecture.md, "Direct publishing"). A node
binds each held room twice: by its room key and by the *addressed* key ``{room key}.{node
key}`` (:func:`~._names.addressed_key`; both words hashed if together over 255 bytes). A
publish with ``to`` (the room's remote hosts, at most :data:`~._broker.MAX_ADDRESSED`) goes
out once, with the first host's addressed key as routing key and the others' in a ``BCC``
header: RabbitMQ routes the one message to exactly the hosts' queues (each once; BCC is
stripped before delivery), never back to the publisher's. The node maps the *first word* of
the routing key a frame arrived with to the held room (a BCC'd copy carries the first host's
key). A publish without ``to`` uses the room key, which every host is bound by.

Two connections per node, as RabbitMQ recommends (flow control throttles a publishing
connection, which must not stall consumption): the *subscriber* connection holds the queue, its
bindings and the consumer; the *publisher* connection has one channel in confirm mode.
``publish`` returns once RabbitMQ confirmed the frame; a nack raises
:class:`~roomrouter.BrokerUnavailable`, and so does a failure before the frame was written ("not
sent"), while a lost connection or a missing confirmation after it raises
:class:`~roomrouter.PublishOutcomeUnknown`. Many publishes are outstanding at once on the
channel, in call order. Each connection is kept by a task that reconnects with capped
exponential backoff; the subscriber side redeclares the queue (under a new name: the old
exclusive queue may linger until the server notices the dead connection), rebinds every held
room and the control plane, consumes again, and only then calls ``on_reconnect``.

Persistence. A persisted frame is *one* confirmed publish on the data exchange, with delivery
mode 2 and a ``BCC`` header (RabbitMQ's sender-selected distribution: extra routing keys,
stripped before delivery) naming ``~store`` and ``~recent.{room key}``. Its routing key is the
room's key, or with ``to`` the addressed keys as in ``publish`` (the BCC then names the other
hosts too), when other nodes host the room; else ``~store``. RabbitMQ routes one message as a
unit, so there is no state in which a frame was delivered live but not stored, and the
publisher confirm comes only once every queue took it. Call order is send order, since it is
the same confirm channel and outbox as ``publish``.

* The *storage queue* ``rr.{ns}.store`` is a durable **quorum** queue bound to the data
  exchange by ``~store`` (so it receives every persisted frame of every room, and no live-only
  one). Quorum rather than classic: it is the one place a confirmed message must survive, and
  a quorum queue replicates it across a RabbitMQ cluster, always writes to disk and confirms
  only after a majority has it; classic queues are single-node (mirroring is deprecated). Nodes
  declare it on every publisher (re)connect, workers on start.
* The *recent cache* of a room is a durable classic queue ``rr.{ns}.recent.{room key}`` bound
  by ``~recent.{room key}``, capped at ``recent_size + 1`` frames (``x-overflow: drop-head``)
  and deleted after ``recent_ttl`` seconds unused. The publisher declares and binds it with
  no-wait methods on its confirm channel just before the first persisted frame of the room
  (and again every ``recent_ttl / 4``), so it costs no round trip and the frame behind it is
  routed to it. It is read without being consumed; see :meth:`RabbitMQBroker.recent`. Classic,
  not quorum: it is a cache, requeued frames must keep their places, and it is one per room.
  (A stream per namespace would avoid a queue per room, but RabbitMQ < 3.13 cannot filter a
  stream by room, so every read would scan the namespace's whole retained traffic.)
* *Storage workers* consume the storage queue with manual acks (``_storage``). A dead
  worker's unacknowledged frames are requeued by RabbitMQ the moment its connection closes, so
  ``redelivery_after`` has nothing to do here.

The client is aiormq, the AMQP layer under aio-pika (the ``rabbitmq`` extra). aio-pika's
``Exchange.publish`` holds the channel lock until each frame is written, and even aiormq's
``basic_publish`` costs one writer round and one ``send`` syscall per message; publishes are
therefore framed here and written in batches on aiormq's connection, with aiormq's own
confirmation bookkeeping: the three aiormq internals this needs are in ``_aiormq``, which
refuses an aiormq version they were not read in. Publishes go through the transport core's
:class:`~roomrouter.brokers.transport.Outbox` (the settle rule: "not sent" vs "outcome
unknown"): a publish gets its delivery tag only when its bytes are packed, after
``Transmit.sent()``, so one the outbox failed as "not sent" is never written. aio-pika's robust
connection restores what *it* declared, on its schedule; the node must restore *its* held rooms
and then tell the router, so both connections follow the core's reconnect template
(:func:`~roomrouter.brokers.transport.keep_connected`). The management HTTP API is read
through aiohttp.

Modules: ``_broker`` (the node: subscriber connection, subscriptions, recent reads,
introspection), ``_publisher`` (the confirm channel, its outbox and sender), ``_storage`` (the
storage queue's consumer), ``_recent`` (the non-consuming read), ``_wire`` (AMQP framing),
``_names``, ``_management``, ``_common`` and ``_aiormq`` (the adapter).
"""

from __future__ import annotations

from ._broker import RabbitMQBroker
from ._names import amqp_name, routing_key

__all__ = ["RabbitMQBroker", "amqp_name", "routing_key"]
