"""The columnar record decoding hands the stream consumer exactly what kafka-python's own decoding would.

The stream consumer reads its records through :mod:`pipelines.kafka_columns`; if a field came out
wrong (an offset, a value's bytes, a header), events would be stored wrong or skipped. So the columns
are compared with kafka-python's stock records: on batches built here (every size of length prefix,
null keys and values, headers, log-append time, corrupt lengths) and on a real broker (gzip batches,
a multi-MB record, a record limit that splits a fetch, commits that land inside a batch).
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from kafka import OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from pipelines import kafka_columns, kafka_io

T0 = 1_780_000_000_000


def _build(records, base_offset=0, log_append_ms=None) -> DefaultRecordBatch:
    """A v2 batch of ``(timestamp, key, value, headers)`` as a producer builds it (and a broker stamps it)."""
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, batch_size=1 << 30)
    for i, (ts, key, value, headers) in enumerate(records):
        builder.append(i, ts, key, value, headers)
    buf = builder.build()
    buf[0:8] = base_offset.to_bytes(8, "big", signed=True)  # the broker's base offset
    if log_append_ms is not None:  # the broker's log-append time: attribute bit 3 and the batch's max timestamp
        buf[DefaultRecordBatch.ATTRIBUTES_OFFSET + 1] |= DefaultRecordBatch.TIMESTAMP_TYPE_MASK
        buf[DefaultRecordBatch.ATTRIBUTES_OFFSET + 14:DefaultRecordBatch.ATTRIBUTES_OFFSET + 22] = \
            log_append_ms.to_bytes(8, "big")
    return DefaultRecordBatch(bytes(buf))


def _stock(batches) -> list[tuple]:
    return [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for b in batches
            for r in DefaultRecordBatch(b._buffer)]


def _columns(batches) -> list[tuple]:
    cols = kafka_columns.decode_records(batches, "t", 0)
    return [(int(cols.offsets[i]), int(cols.timestamps[i]), cols.keys[i].as_py(), cols.values[i].as_py(),
             cols.record_headers(i)) for i in range(len(cols))]


_bytes = st.one_of(st.none(), st.binary(max_size=40),
                   st.integers(0, 20_000).map(lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256)))
_record = st.tuples(st.integers(T0 - 10**9, T0 + 10**9), _bytes, _bytes,
                    st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=300))),
                             max_size=3))


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_record, min_size=1, max_size=40), min_size=1, max_size=4),
       st.integers(0, 2**40), st.booleans())
def test_fields_equal_kafka_python_records(batches, base, log_append):
    """Keys and values of every size (one-, two- and three-byte length prefixes), nulls, headers, several batches."""
    built, offset = [], base
    for recs in batches:
        built.append(_build(recs, offset, log_append_ms=T0 + 5 if log_append else None))
        offset += len(recs) + 3  # gaps between batches, as compaction leaves them
    assert _columns(built) == _stock(built)


def test_corrupt_lengths_raise_a_clear_error():
    batch = _build([(T0, b"k", b'{"event_id":"e1"}', []), (T0, b"k", b'{"event_id":"e2"}', [])])
    body = bytearray(batch._buffer)
    first = DefaultRecordBatch.HEADER_STRUCT.size
    for at, byte in ((first, body[first] + 2),  # the first record claims one byte more than it has
                     (first + 4, 0x7E)):  # a key length past the end of its record
        broken = bytearray(body)
        broken[at] = byte
        with pytest.raises(CorruptRecordError, match="partition 3"):
            kafka_columns.decode_records([DefaultRecordBatch(bytes(broken))], "t", 3)


def _topic(settings, partitions=2) -> str:
    name = f"cols-{uuid.uuid4().hex[:8]}"
    admin = kafka_io.make_admin(settings)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


def _consume_all(settings, topic, n, columnar, group=None, max_records=500, **kw):
    """``{(partition, offset): (timestamp, key, value, headers)}`` of the first ``n`` records of ``topic``."""
    consumer = kafka_io.make_consumer(settings, (topic,), group=group or f"g-{uuid.uuid4().hex[:6]}",
                                      max_poll_records=max_records, **kw)
    if columnar:
        kafka_columns.install(consumer)
    got = {}
    try:
        for _ in range(200):
            for tp, recs in consumer.poll(timeout_ms=500).items():
                if columnar:
                    for cols in recs:
                        for i in range(len(cols)):
                            got[(tp.partition, int(cols.offsets[i]))] = (
                                int(cols.timestamps[i]), cols.keys[i].as_py(), cols.values[i].as_py(),
                                cols.record_headers(i))
                else:
                    for r in recs:
                        got[(tp.partition, r.offset)] = (r.timestamp, r.key, r.value, list(r.headers))
            if len(got) >= n:
                break
    finally:
        consumer.close()
    return got


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_columns_equal_stock_records_from_the_broker(settings, compression):
    topic = _topic(settings)
    producer = kafka_io.make_producer(settings, compression_type=compression, linger_ms=20)
    records = [(f"user-{i % 7}", f'{{"event_id":"e{i}","n":{i}}}'.encode() * (1 + i % 30),
                [("trace", str(i).encode())] if i % 11 == 0 else []) for i in range(600)]
    records += [(None, b"no key", []), ("tombstone", None, []), ("big", b"\xff" * (3 * 1024 * 1024), [])]
    futures = [producer.send(topic, key=k, value=v, headers=h, timestamp_ms=T0 + i)
               for i, (k, v, h) in enumerate(records)]
    for f in futures:
        f.get(timeout=30)
    producer.close()
    stock = _consume_all(settings, topic, len(records), columnar=False)
    columns = _consume_all(settings, topic, len(records), columnar=True)
    assert len(stock) == len(records)
    assert columns == stock


def test_record_limit_splits_fetches_and_commits_resume_inside_a_batch(settings):
    """A poll's record limit cuts fetched batches; positions, commits and a restart still line up."""
    topic = _topic(settings, partitions=1)
    producer = kafka_io.make_producer(settings, linger_ms=50)
    for f in [producer.send(topic, value=f"r{i}".encode()) for i in range(100)]:
        f.get(timeout=30)
    producer.close()
    group, tp = f"g-{uuid.uuid4().hex[:6]}", TopicPartition(topic, 0)
    consumer = kafka_columns.install(kafka_io.make_consumer(settings, (topic,), group=group, max_poll_records=7))
    seen = []
    try:
        while len(seen) < 45:
            for chunks in consumer.poll(timeout_ms=500).values():
                assert sum(len(c) for c in chunks) <= 7
                seen += [int(o) for c in chunks for o in c.offsets]
                assert consumer.position(tp) == seen[-1] + 1  # the position is one past what was handed out
        consumer.commit({tp: OffsetAndMetadata(seen[-1] + 1, "", -1)})
    finally:
        consumer.close()
    assert seen == list(range(len(seen)))  # in order, nothing skipped or repeated
    # the committed offset lies inside a producer batch: the next member starts exactly there
    rest = _consume_all(settings, topic, 100 - len(seen), columnar=True, group=group, max_records=9)
    assert sorted(o for _, o in rest) == list(range(len(seen), 100))
    assert rest[(0, len(seen))][2] == f"r{len(seen)}".encode()


def test_transactional_batches_go_through_kafka_pythons_own_path(settings):
    """Committed transactions are read, aborted ones skipped, control records hidden: as the stock client does."""
    topic = _topic(settings, partitions=1)
    plain = kafka_io.make_producer(settings)
    for f in [plain.send(topic, value=f"before{i}".encode()) for i in range(5)]:
        f.get(timeout=30)
    tx = kafka_io.make_producer(settings, transactional_id=f"tx-{uuid.uuid4().hex[:6]}", acks="all", retries=5)
    tx.init_transactions()
    for committed in (True, False, True):
        tx.begin_transaction()
        for i in range(4):
            tx.send(topic, value=f"{'c' if committed else 'a'}{i}".encode())
        tx.commit_transaction() if committed else tx.abort_transaction()
    tx.close()
    for f in [plain.send(topic, value=f"after{i}".encode()) for i in range(5)]:
        f.get(timeout=30)
    plain.close()
    expected = [f"before{i}" for i in range(5)] + [f"c{i}" for i in range(4)] * 2 + [f"after{i}" for i in range(5)]
    stock = _consume_all(settings, topic, len(expected), columnar=False, isolation_level="read_committed")
    columns = _consume_all(settings, topic, len(expected), columnar=True, isolation_level="read_committed")
    assert [v.decode() for _, (_, _, v, _) in sorted(stock.items())] == expected
    assert columns == stock
