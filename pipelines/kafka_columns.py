"""Kafka record batches decoded column-wise: the stream consumer's records without a Python object each.

kafka-python decodes every record in pure Python (seven varints, a ``DefaultRecord``, a
``ConsumerRecord`` with thirteen fields, deserializer calls): about 6.5 µs per record, a whole core at
the consumer's rate. :class:`ColumnarFetcher` keeps everything else of kafka-python (the group
protocol, fetch sessions, positions, commits, the per-batch CRC check, decompression, transactions and
control batches) and replaces only that per-record loop: the record boundaries are found by a short
Python walk over the length prefixes, and every field is then read for all the records of a fetch at
once with numpy (:func:`decode_records`). A poll then returns, per partition, a list of
:class:`RecordColumns` (one per fetch response) instead of a list of ``ConsumerRecord``.

It is installed on one consumer by :func:`install` (the stream consumer's); every other client keeps
kafka-python's stock records. It relies on kafka-python's
``Fetcher.PartitionRecords`` / ``Fetcher._append`` seams, so kafka-python is pinned, and
``tests/pipelines/test_kafka_columns.py`` checks that the columns equal what the stock client returns
for the same records (compressed batches, headers, null keys and values, large records).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

__all__ = ["ColumnarFetcher", "RecordColumns", "decode_records", "install"]


@dataclass
class RecordColumns:
    """Consecutive records of one partition, column-wise.

    Attributes:
        topic, partition: where they come from.
        offsets: ``[n]`` int64, ascending.
        timestamps: ``[n]`` int64, epoch ms (the record's, or the batch's log-append time).
        keys, values: ``[n]`` Arrow binary arrays, null where the record has none.
        headers: per record its ``(key, value)`` header list, or ``None`` when no record has headers.
    """

    topic: str
    partition: int
    offsets: np.ndarray
    timestamps: np.ndarray
    keys: pa.BinaryArray
    values: pa.BinaryArray
    headers: list[list[tuple[str, bytes | None]]] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def slice(self, start: int, stop: int | None = None) -> RecordColumns:
        stop = len(self) if stop is None else stop
        return RecordColumns(self.topic, self.partition, self.offsets[start:stop], self.timestamps[start:stop],
                             self.keys.slice(start, stop - start), self.values.slice(start, stop - start),
                             None if self.headers is None else self.headers[start:stop])

    def record_headers(self, i: int) -> list[tuple[str, bytes | None]]:
        return [] if self.headers is None else self.headers[i]

    @staticmethod
    def concat(parts: list[RecordColumns]) -> RecordColumns:
        """The records of several consecutive chunks of one partition as one."""
        if len(parts) == 1:
            return parts[0]
        headers = None
        if any(p.headers is not None for p in parts):
            headers = [h for p in parts for h in (p.headers if p.headers is not None else [[]] * len(p))]
        return RecordColumns(parts[0].topic, parts[0].partition, np.concatenate([p.offsets for p in parts]),
                             np.concatenate([p.timestamps for p in parts]),
                             pa.concat_arrays([p.keys for p in parts]), pa.concat_arrays([p.values for p in parts]),
                             headers)


def _varints(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zig-zag varints (Kafka's record fields) starting at each of ``pos``; returns values and next positions."""
    byte = buf[pos].astype(np.int64)
    value = byte & 0x7F
    nxt = pos + 1
    more = np.flatnonzero(byte & 0x80)
    shift = 7
    while len(more):
        if shift >= 64:
            raise CorruptRecordError("a record field's varint is out of int64 range")
        byte = buf[nxt[more]].astype(np.int64)
        value[more] |= (byte & 0x7F) << shift
        nxt[more] += 1
        more = more[(byte & 0x80) != 0]
        shift += 7
    return (value >> 1) ^ -(value & 1), nxt


def _slices(data: pa.Buffer, buf: np.ndarray, start: np.ndarray, length: np.ndarray) -> pa.BinaryArray:
    """``data[start:start+length]`` of each record as an Arrow binary array (``length < 0``: null)."""
    n = len(start)
    null = length < 0
    size = np.where(null, 0, length)
    # Arrow's binary view layout points into the buffer without copying: per element its length and,
    # up to 12 bytes, the bytes inline, else a 4-byte prefix, the buffer index (0) and the offset
    views = np.zeros((n, 16), dtype=np.uint8)
    views[:, :4] = size.astype("<i4").view(np.uint8).reshape(n, 4)
    if n:
        gather = np.minimum(start[:, None] + np.arange(12), len(buf) - 1)
        head = buf[gather]
        head[np.arange(12)[None, :] >= size[:, None]] = 0
        views[:, 4:16] = head
        long = size > 12
        views[long, 8:12] = 0
        views[long, 12:16] = start[long].astype("<i4").view(np.uint8).reshape(-1, 4)
    validity = None
    if null.any():
        validity = pa.py_buffer(np.packbits(~null, bitorder="little"))
    view = pa.Array.from_buffers(pa.binary_view(), n, [validity, pa.py_buffer(views), data],
                                 null_count=int(null.sum()))
    return view.cast(pa.binary())


def decode_records(batches: list[DefaultRecordBatch], topic: str, partition: int) -> RecordColumns:
    """Decode the records of ``batches`` (v2 record batches, CRC checked, of one partition) column-wise.

    Raises:
        CorruptRecordError: a record's fields do not add up to its length, or a batch holds fewer or more
            bytes than its records.
    """
    regions, base_offsets, first_ts, counts = [], [], [], []
    for batch in batches:
        batch._maybe_uncompress()  # kafka-python's own decompression (gzip, snappy, lz4, zstd)
        body = memoryview(batch._buffer)[batch._pos:]
        regions.append(body)
        base_offsets.append(batch.base_offset)
        # log-append time: every record carries the batch's max timestamp (as kafka-python reads it)
        first_ts.append(-1 if batch.timestamp_type == batch.LOG_APPEND_TIME else batch.first_timestamp)
        counts.append(batch.records_count)
    raw = b"".join(regions)
    buf = np.frombuffer(raw, dtype=np.uint8)
    n = sum(counts)
    # the one sequential part: each record starts where the previous one ends (length-prefixed)
    body_start = np.empty(n, dtype=np.int64)
    body_len = np.empty(n, dtype=np.int64)
    pos = i = region_start = 0
    for body, count in zip(regions, counts):
        region_end = region_start + len(body)
        for _ in range(count):
            # inline the one- and two-byte lengths (records under 8 KiB); decode_varint for the rest
            b = raw[pos]
            if not b & 0x81:
                length, pos = b >> 1, pos + 1
            elif not b & 0x01 and not raw[pos + 1] & 0x80:
                length, pos = ((b & 0x7F) | (raw[pos + 1] << 7)) >> 1, pos + 2
            else:
                length, pos = decode_varint(raw, pos)
            if length < 0 or pos + length > region_end:
                raise CorruptRecordError(f"record of invalid length {length} in partition {partition}")
            body_start[i], body_len[i] = pos, length
            pos += length
            i += 1
        if pos != region_end:
            raise CorruptRecordError(f"{region_end - pos} unconsumed bytes after all records of a batch "
                                     f"in partition {partition}")
        region_start = region_end
    try:
        _, p = _varints(buf, body_start)  # attributes (unused)
        ts_delta, p = _varints(buf, p)
        offset_delta, p = _varints(buf, p)
        key_len, p = _varints(buf, p)
        key_start = p
        value_len, p = _varints(buf, p + np.maximum(key_len, 0))
        value_start = p
        header_count, p = _varints(buf, p + np.maximum(value_len, 0))
    except IndexError as err:
        raise CorruptRecordError(f"record fields run past their batch in partition {partition}") from err
    per_batch = np.asarray(counts)
    offsets = np.repeat(np.asarray(base_offsets, dtype=np.int64), per_batch) + offset_delta
    ts0 = np.repeat(np.asarray(first_ts, dtype=np.int64), per_batch)
    timestamps = np.where(ts0 >= 0, ts0 + ts_delta, 0)
    if (ts0 < 0).any():
        max_ts = np.repeat(np.asarray([b.max_timestamp for b in batches], dtype=np.int64), per_batch)
        timestamps = np.where(ts0 >= 0, timestamps, max_ts)
    headers = None
    if (header_count != 0).any():
        if (header_count < 0).any():
            raise CorruptRecordError(f"invalid number of record headers in partition {partition}")
        headers = [[] for _ in range(n)]
        p = p.copy()
        for j in np.flatnonzero(header_count):
            headers[j], p[j] = _read_headers(raw, int(p[j]), int(header_count[j]))
    if (p - body_start != body_len).any():
        j = int(np.flatnonzero(p - body_start != body_len)[0])
        raise CorruptRecordError(f"invalid record size at offset {offsets[j]} of partition {partition}: "
                                 f"expected {body_len[j]} bytes, read {p[j] - body_start[j]}")
    data = pa.py_buffer(raw)
    return RecordColumns(topic, partition, offsets, timestamps, _slices(data, buf, key_start, key_len),
                         _slices(data, buf, value_start, value_len), headers)


def _read_headers(raw: bytes, pos: int, count: int) -> tuple[list[tuple[str, bytes | None]], int]:
    headers = []
    for _ in range(count):
        key_len, pos = decode_varint(raw, pos)
        if key_len < 0:
            raise CorruptRecordError(f"invalid negative header key size {key_len}")
        key = raw[pos:pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = decode_varint(raw, pos)
        value = None
        if value_len >= 0:
            value, pos = raw[pos:pos + value_len], pos + value_len
        headers.append((key, value))
    return headers, pos


class ColumnarPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's fetched records of one partition, handed out as :class:`RecordColumns` chunks."""

    _pending: RecordColumns | None = None  # the rest of a chunk that a poll's record limit split

    def _maybe_skip_record(self, record):
        return False  # records before the fetch offset are sliced off in _unpack_records

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
        batches = []
        batch = records.next_batch()
        while batch is not None:
            if batch.magic != 2:
                raise CorruptRecordError(f"partition {tp}: message format v{batch.magic} (Kafka < 0.11) "
                                         "is not supported by the columnar consumer")
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(f"Record batch for partition {tp} at offset {batch.base_offset} "
                                         "failed crc check")
            self.leader_epoch = batch.leader_epoch
            if batch.is_transactional or batch.is_control_batch:
                # transactions are rare here: the stock path handles aborted sets and control batches
                yield from self._stock(tp, batches, records, batch, key_deserializer, value_deserializer)
                return
            batches.append(batch)
            batch = records.next_batch()
        if batches:
            cols = decode_records(batches, tp.topic, tp.partition)
            cols = cols.slice(int(np.searchsorted(cols.offsets, self.fetch_offset)))  # inside a batch
            self.records_read += len(cols)
            self.bytes_read += sum(b.size_in_bytes for b in batches)
            if len(cols):
                self.next_fetch_offset = int(cols.offsets[-1]) + 1
                yield cols
            self.next_fetch_offset = max(self.next_fetch_offset, batches[-1].next_offset)
        self.drain()

    def _stock(self, tp, decoded, records, batch, key_deserializer, value_deserializer):
        """Hand what came before ``batch`` out column-wise and the rest through kafka-python's own loop."""
        if decoded:
            cols = decode_records(decoded, tp.topic, tp.partition)
            cols = cols.slice(int(np.searchsorted(cols.offsets, self.fetch_offset)))
            if len(cols):
                self.next_fetch_offset = int(cols.offsets[-1]) + 1
                yield cols

        class _Rest:  # the remaining batches, starting with ``batch``, as kafka-python's loop reads them
            def __init__(self):
                self.first = batch

            def next_batch(self):
                if self.first is not None:
                    first, self.first = self.first, None
                    return first
                return records.next_batch()

        for rec in super()._unpack_records(tp, _Rest(), key_deserializer, value_deserializer):
            if rec.offset < self.fetch_offset:
                continue
            yield RecordColumns(rec.topic, rec.partition, np.array([rec.offset], dtype=np.int64),
                                np.array([rec.timestamp], dtype=np.int64), pa.array([rec.key], pa.binary()),
                                pa.array([rec.value], pa.binary()), [list(rec.headers)] if rec.headers else None)

    def take(self, n=None):
        """At most ``n`` records, as a list of chunks (the last one split if need be)."""
        self._maybe_raise_next_inline_exception()
        out, left = [], n if n is not None else float("inf")
        try:
            while left > 0 and self.record_iterator is not None:
                chunk, self._pending = self._pending, None
                if chunk is None:
                    chunk = next(self.record_iterator, None)
                    if chunk is None:
                        break
                if len(chunk) > left:
                    chunk, self._pending = chunk.slice(0, int(left)), chunk.slice(int(left))
                out.append(chunk)
                left -= len(chunk)
                # the position moves past what is handed out (the generator moves it past its last batch
                # once it is resumed and finds nothing more)
                self.next_fetch_offset = int(chunk.offsets[-1]) + 1
        except Exception as e:  # noqa: BLE001 - as kafka-python's take: raise at the next call if data came
            if not out:
                raise
            self._next_inline_exception = e
        return out


class ColumnarFetcher(Fetcher):
    """kafka-python's Fetcher, its records handed out as :class:`RecordColumns` chunks."""

    PartitionRecords = ColumnarPartitionRecords

    def _append(self, drained, part, max_records, update_offsets):
        tp = part.topic_partition if part else None
        before = sum(len(c) for c in drained.get(tp, ())) if tp in drained else 0
        super()._append(drained, part, max_records, update_offsets)
        return sum(len(c) for c in drained.get(tp, ())) - before if tp in drained else 0


def install(consumer: KafkaConsumer) -> KafkaConsumer:
    """Make ``consumer.poll()`` return ``{TopicPartition: [RecordColumns, ...]}`` (see the module doc)."""
    consumer._fetcher.__class__ = ColumnarFetcher
    return consumer
