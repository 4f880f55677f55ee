"""Kafka broker: one topic per namespace, key = room, and a node *assigns* itself (no consumer
group) exactly the partitions that hold its rooms.

Topics (``{prefix}`` is ``roomrouter`` unless ``topic_prefix`` says otherwise, and the
namespace is kept if it is a legal topic name without dots, else sanitised and followed by
``.`` and a hash, so no two namespaces share a topic; see ``_common.names``):

* ``{prefix}.{namespace}.data`` -- ``partitions`` partitions (default 16). A frame of room R is
  a record with key ``R`` (UTF-8) in partition ``murmur2(key) % partitions``, the partitioner
  of the Java client, so every record of a room lands in one partition, in send order.
* ``{prefix}.{namespace}.control`` -- one partition every node reads. The record key says who
  it is for: ``*`` every node, ``@{node}`` one node (the others skip it), ``#{node}`` a marker
  or health probe of that node (everyone skips it).

Both are created (admin client) when missing. A topic that already exists keeps its partition
count, and every node reads that count from the broker when it connects, so nodes agree on
which partition holds a room even if someone else created the topic.

**Dynamic subscription.** The consumer's manual assignment is always: the control partition
plus the partitions of the rooms with local members. A partition shared with rooms this node
does not host still delivers their records to the client; they are dropped by key, before any
decoding, and counted in :attr:`KafkaBroker.filtered`.

**Where a newly subscribed room starts (markers).** :meth:`KafkaBroker.subscribe` appends one
empty *marker* record (null key) to each partition of the batch, with ``acks`` and waits for
the broker's answer, which carries the marker's offset ``M``. Kafka appends to a partition in
one total order, so every record acknowledged before the subscribe started sits below ``M``
and every record produced after ``subscribe`` returns sits above it. Then, synchronously (no
``await`` between the two steps, so the reader cannot interleave), the room's *threshold* is set
to ``M + 1`` -- the reader drops records of that room with a lower offset, which covers a room
joining a partition that is already assigned and still has a backlog -- and a newly assigned
partition is positioned with ``seek(M + 1)``. A seek sets the fetch position in the client at
once, so nothing depends on the broker's offset-reset logic. The control partition is entered
the same way at start and after a reconnect.

Kafka behaviours this relies on (Apache Kafka and Tansu both have them; Tansu 0.6 was checked):

* a produce response carries the offset the broker assigned to the record (``acks`` of
  ``1`` or ``all``; ``acks=0`` is refused because it returns no offset);
* offsets within a partition grow in append order, and a fetch from offset ``o`` returns the
  records at ``>= o`` in order;
* nothing else: not ``ListOffsets`` (``end_offsets``/``seek_to_end``, which Tansu answers
  wrongly after batched produces), not ``auto_offset_reset`` (``latest`` replays old records on
  Tansu; the consumer runs with ``none`` and is always positioned explicitly), not record
  timestamps (node clocks may disagree), not consumer groups.

Positions of partitions that stay assigned survive a re-assignment (aiokafka resets every
partition's state on :meth:`assign`): the reader tracks the next offset of every assigned
partition itself and the broker seeks back to it.

**Control plane.** Control frames are records on the control partition, so a frame sent to one
node is still read by all, and skipped by key. ``counts_receivers`` is False: Kafka cannot say
who read a record, so a starting router listens for ``discovery_window`` seconds, unless its
marker is the control partition's first record (:meth:`KafkaBroker.count_nodes`) or the first
answers' live lists say everyone answered.

**Publishing** (``_publish``, on the transport core's ``Outbox``). One producer per node,
``acks="all"`` by default, ``linger_ms`` 0 by default; no idempotent or transactional
producer (Tansu refuses them). :meth:`publish` appends to the outbox before its first
``await`` and waits on a future for the broker's acknowledgement. One sender task moves the
queue's head into one producer batch per partition (``create_batch``/``send_batch``: the
per-record ``send()`` costs a coroutine, a future and metadata lookups, most of the
publisher's CPU) and hands them on without awaiting answers, so call order is send order and
many publishes share a request. One done callback per batch settles its publishes. The
settle rule: a record is sent exactly when the producer took its batch; one whose deadline
passed while queued, or while its batch waited for the partition's previous one, fails with
``BrokerUnavailable`` and is never handed on; one the producer has fails at its deadline, or
when the session is lost, with ``PublishOutcomeUnknown``. Bound: at most ``max_pending``
records (default 10 000) are handed on and unanswered; beyond that the queue waits and its
callers stay suspended (backpressure by awaiting, in call order), each at most the operation
timeout.

**Batching without lingering.** aiokafka keeps one produce request in flight per broker
connection; whatever is published meanwhile waits in the send queue and goes as one batch per
partition in the next request. That already makes batches as large as the load and the
broker's round trip allow, so ``linger_ms`` defaults to 0: a linger adds nothing under load
and delays every publish of a publisher that waits for its acknowledgements (a sequential
loop, a few tasks) by its full value, with no request in flight to hide it. On Tansu
(``benchmarks/kafka_publish.py``, medians of 3 on a shared 2-core host), 64 tasks went from
24k to 49k msg/s and one sequential loop from 504 to 1,580.

A publisher that awaits each acknowledgement is bounded by ``tasks / round trip``, like raw
aiokafka's ``send_and_wait()`` in the same shape, which stays ~1.15-1.4x ahead: the hand-off
to the sender task costs one event-loop iteration on the way out, and the answer reaches the
caller two iterations later than aiokafka's own per-record futures (``send_batch`` returns a
shielded future; one done callback then settles the batch's publishes). And a node reading
the partition makes Tansu slower to answer: in a sequential loop Tansu used ~1 ms of CPU per
publish with a reader attached and ~0.25 ms without, for raw aiokafka and this broker alike,
on cores the publisher shares.

**Latency.** ``fetch_max_wait_ms`` defaults to 10. Apache Kafka answers a fetch as soon as one
byte is there (``fetch_min_bytes=1``), so on it the wait only bounds idle polling; Tansu 0.6
holds every fetch for the full wait, so there it is the latency: measured on one host
(``benchmarks/_kafka_probe.py``), 10 ms gives p50 ~5 ms publish-to-receive, 500 ms gives
~250 ms. The price of 10 ms is ~100 fetch requests per second per idle node (~5% of a core
with Tansu); on Apache Kafka ``?fetch_max_wait_ms=500`` keeps the latency and drops that cost.

**Holes.** Tansu can serve records past an offset that is not readable yet (several producers
appending to one partition). The reader accepts records only in offset order and seeks back to
a hole until it fills (``_common.OffsetGuard``), so no live frame is skipped for good.

**Storage** (``_storage``): the data topic is also the storage queue and the recent cache.
A persisted frame is one record flagged with a header; storage workers are the consumer group
``{prefix}.{namespace}.store`` and commit after the sink did; ``recent(room)`` reads the room's
partition backwards from a fresh marker.

**Faults.** aiokafka reconnects sockets on its own but cannot tell a broker that restarted
with an empty log (Tansu's memory storage, or topics deleted) from one that is merely quiet: a
fetch beyond the end of a recreated partition just comes back empty. So every
``health_interval`` the node appends a probe record to the control partition and expects to
read it back within ``operation_timeout``. If that fails, or a client call fails, the node
drops its clients, reconnects with capped exponential backoff (the transport core's
``keep_connected``; a session that fails at once again and again backs off further),
recreates missing topics, re-enters the control partition and every assigned partition with
fresh markers (a recreated partition restarts at offset 0), and then calls
``context.on_reconnect()``. Frames published
while the node was cut off are lost (live delivery is at-most-once).

**Modules.** ``_broker`` (:class:`KafkaBroker`: options, lifecycle, reconnect, subscriptions),
``_reader`` (what a node reads: the assignment, thresholds and positions, the read loop, the
health probe), ``_session`` (one connection epoch's clients, the marker records),
``_publish`` (the publish path on the transport core's outbox), ``_storage`` (the storage
consumer group and the recent scan), ``_common`` (names, the partitioner, topic creation, the
offset guard).
"""

from __future__ import annotations

from ._broker import KafkaBroker

__all__ = ["KafkaBroker"]
