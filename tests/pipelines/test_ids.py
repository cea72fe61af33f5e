"""Event and request ids: unique, valid as event ids, and not repeated by a forked worker."""

from __future__ import annotations

import os

import orjson

from pipelines import schemas


def test_ids_are_unique_and_valid_event_ids():
    ids = [schemas.new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    ev = schemas.new_event("view", "u1", "i1", "s1")
    assert schemas.parse_event_dict(orjson.dumps(ev))["event_id"] == ev["event_id"]


def test_a_forked_child_does_not_repeat_the_parents_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its next ids
        os.write(write, "".join(schemas.new_id() for _ in range(4)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode()
    parent = "".join(schemas.new_id() for _ in range(4))
    assert child and child != parent
