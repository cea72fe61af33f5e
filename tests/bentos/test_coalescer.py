"""The API process's request coalescing in front of the scoring service's adaptive batching."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.serving import Coalescer


class Scorer:
    """A list-taking async scorer that answers each request with its own user id, after a pause."""

    def __init__(self, pause_s: float = 0.02, fail: bool = False):
        self.sizes: list[int] = []
        self.pause_s, self.fail = pause_s, fail

    async def __call__(self, requests: list[dict]) -> list[dict]:
        self.sizes.append(len(requests))
        await asyncio.sleep(self.pause_s)
        if self.fail:
            raise ConnectionError("scorer down")
        return [{"items": [[r["user_id"], 1.0]]} for r in requests]


def test_concurrent_requests_share_calls_and_each_gets_its_own_answer():
    scorer = Scorer()
    co = Coalescer(scorer, max_batch=64, max_in_flight=2)

    async def main():
        return await asyncio.gather(*(co([{"user_id": f"u{n}"}]) for n in range(200)))

    answers = asyncio.run(main())
    assert [a[0]["items"][0][0] for a in answers] == [f"u{n}" for n in range(200)]
    assert sum(scorer.sizes) == 200 and max(scorer.sizes) <= 64
    assert len(scorer.sizes) <= 6  # 200 one-request calls became a handful of list calls


def test_an_idle_request_leaves_at_once():
    scorer = Scorer(pause_s=0.0)
    co = Coalescer(scorer, max_batch=64)

    async def main():
        request = asyncio.ensure_future(co([{"user_id": "u1"}]))
        for _ in range(5):  # a few turns of the event loop, no clock time: a batching window would still be open
            await asyncio.sleep(0)
        sent = list(scorer.sizes)
        return sent, await request

    sent, answer = asyncio.run(main())
    assert sent == [1] and answer == [{"items": [["u1", 1.0]]}]


def test_a_failing_call_fails_its_callers_and_the_next_calls_still_work():
    scorer = Scorer(fail=True)
    co = Coalescer(scorer, max_batch=8, max_in_flight=1)

    async def main():
        results = await asyncio.gather(*(co([{"user_id": f"u{n}"}]) for n in range(10)), return_exceptions=True)
        scorer.fail = False
        return results, await co([{"user_id": "again"}])

    results, again = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) for r in results)
    assert again[0]["items"][0][0] == "again"


def test_a_caller_past_its_deadline_does_not_disturb_the_others():
    scorer = Scorer(pause_s=0.05)
    co = Coalescer(scorer, max_batch=8, max_in_flight=1)

    async def main():
        late = asyncio.ensure_future(asyncio.wait_for(co([{"user_id": "late"}]), timeout=0.01))
        others = [co([{"user_id": f"u{n}"}]) for n in range(5)]
        done = await asyncio.gather(*others)
        with pytest.raises(asyncio.TimeoutError):
            await late
        return done

    assert [a[0]["items"][0][0] for a in asyncio.run(main())] == [f"u{n}" for n in range(5)]



def test_concurrent_users_read_their_own_redis_context_in_shared_round_trips(redis_url, redis_client):
    """Recent and bought items of 100 concurrent requests come from a few pipelines, each user's own."""
    import uuid

    from pipelines.schemas import new_event
    from pipelines.state import AsyncServingState, OnlineState

    tag = uuid.uuid4().hex[:6]
    users = [f"ctx-{tag}-{n}" for n in range(100)]
    OnlineState(redis_client).apply_events(
        [e for n, u in enumerate(users) for e in (new_event("view", u, f"seen-{n}", "s"),
                                                   new_event("purchase", u, f"bought-{n}", "s", price=1.0,
                                                             quantity=1))])
    astate = AsyncServingState(redis_url)
    pipelines_sent = []

    async def contexts(user_ids):
        pipelines_sent.append(len(user_ids))
        return await astate.user_contexts(user_ids)

    co = Coalescer(contexts, max_batch=64, max_in_flight=1)

    async def main():
        return await asyncio.gather(*(co([u]) for u in users + ["ctx-nobody"]))

    answers = [a[0] for a in asyncio.run(main())]
    for n, (recent, bought) in enumerate(answers[:-1]):
        assert recent == [f"bought-{n}", f"seen-{n}"] and bought == {f"bought-{n}"}
    assert answers[-1] == ([], set())
    assert sum(pipelines_sent) == 101 and len(pipelines_sent) <= 4
