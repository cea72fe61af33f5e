"""The batched Redis writes of the consumer: event_id claims and the online-state fold."""

from __future__ import annotations

import time
import uuid

from pipelines.schemas import RedisKeys, new_event, validate_event
from pipelines.state import OnlineState


def test_claims_report_only_duplicates_and_let_a_replayed_record_through(redis_client):
    state = OnlineState(redis_client)
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    assert state.claim_event_ids([a, b], ["0:10", "0:11"], 600) == {}
    # the same records again (a replay after a crash) are not duplicates; the same id elsewhere is
    assert state.claim_event_ids([a, b, c, a], ["0:10", "0:11", "1:5", "2:7"], 600) == {3: "0:10"}
    assert redis_client.get(RedisKeys.event_id(c)) == "1:5"
    assert 0 < redis_client.ttl(RedisKeys.event_id(c)) <= 600


def test_the_fold_gives_the_same_state_from_dicts_as_from_models(redis_client):
    tag = uuid.uuid4().hex[:6]

    def batch(u: str) -> list[dict]:
        rid = f"r-{u}"
        return [new_event("impression", u, None, "s1", items=["a", "b"], request_id=rid, variant="challenger"),
                new_event("view", u, "a", "s1"), new_event("click", u, "b", "s1", request_id=rid),
                new_event("add_to_cart", u, "b", "s1", request_id=rid, variant="challenger"),
                new_event("purchase", u, "b", "s1", price=3.5, quantity=1)]

    by_dict = OnlineState(redis_client, experiment=f"d-{tag}", recent_cap=3)
    by_model = OnlineState(redis_client, experiment=f"m-{tag}", recent_cap=3)
    ud, um = f"ud-{tag}", f"um-{tag}"
    by_model.set_cached(um, "champion", {"items": ["x"]})
    by_dict.set_cached(ud, "champion", {"items": ["x"]})
    by_dict.apply_events([{k: v for k, v in e.items() if v is not None} for e in batch(ud)])
    by_model.apply_events([validate_event(e) for e in batch(um)])
    for state, user in ((by_dict, ud), (by_model, um)):
        recent, bought = state.user_context(user)
        assert recent == ["b", "b", "b"]  # capped at 3, newest first
        assert bought == {"b"}
        assert state.get_cached(user, "champion") is None  # the user's cached lists were invalidated
        assert state.ab_counts() == {"challenger": {"impressions": 1, "clicks": 1, "carts": 1}}
        # nothing per user or per comparison stays in Redis for good (bots and one-off visitors included)
        assert 29 * 86_400 < redis_client.ttl(RedisKeys.recent(user)) <= 30 * 86_400
        ab_keys = redis_client.keys(RedisKeys.ab("*", "*")) + redis_client.keys(RedisKeys.counter("ab:*", 0)[:-2] + "*")
        assert ab_keys and all(redis_client.ttl(k) > 0 for k in ab_keys), [(k, redis_client.ttl(k)) for k in ab_keys]
        assert redis_client.get(RedisKeys.request(f"r-{user}")) == f"challenger {state.experiment}"
    state = by_dict
    state.refresh_trending()
    assert dict(state.trending(10))["b"] > dict(state.trending(10))["a"] > 0


def test_a_large_batch_of_one_user_is_folded(redis_client):
    state = OnlineState(redis_client, recent_cap=50)
    user = f"big-{uuid.uuid4().hex[:6]}"
    state.apply_events([{**new_event("view", user, f"i{i}", "s")} for i in range(5000)])
    assert state.recent_items(user, 3) == ["i4999", "i4998", "i4997"]
    assert redis_client.llen(RedisKeys.recent(user)) == 50


def test_several_consumers_add_up_and_a_member_without_partitions_is_counted(redis_client):
    import time

    state = OnlineState(redis_client)
    now = time.time()
    state.set_consumer_status("host-1", lag=30, rate_eps=10.5, consumed=1000, partitions=4, last_commit_ts=now - 2,
                              updated_ts=now)
    state.set_consumer_status("host-2", lag=12, rate_eps=4.0, consumed=500, partitions=2, last_commit_ts=now - 1,
                              updated_ts=now - 1)
    state.set_consumer_status("host-3", lag=0, rate_eps=0.0, consumed=0, partitions=0, last_commit_ts=0,
                              updated_ts=now)
    state.set_consumer_status("gone", lag=999, rate_eps=99.0, consumed=7, partitions=6, updated_ts=now - 3600)
    st = state.consumer_status()
    assert (st["lag"], st["rate_eps"], st["consumed"]) == ("42", "14.5", "1500")  # the one that stopped is left out
    assert (st["members"], st["idle_members"]) == ("3", "1")
    assert float(st["last_commit_ts"]) == now - 1 and float(st["updated_ts"]) == now
    assert 0 < redis_client.ttl(RedisKeys.consumer_member("host-1")) <= 86_400  # a member's hash does not outlive it


def test_ab_counts_are_kept_per_comparison_and_clicks_follow_their_impression(redis_client):
    """A challenger that appears starts a new comparison: the champion's earlier traffic stays out of it (it
    would look like a sample-ratio mismatch), and a click finds its comparison through its request."""
    name = f"exp-{uuid.uuid4().hex[:6]}"
    state = OnlineState(redis_client, experiment=name)
    solo, pair = f"{name}@champion.1", f"{name}@champion.1:challenger.2"

    def shown(rid, variant, tag, ts):
        return new_event("impression", "u", None, "s", ts=ts, items=["i"], request_id=rid, variant=variant,
                         experiment=tag)

    state.apply_events([shown(f"a{n}", "champion", solo, 1000 + n) for n in range(5)])
    state.apply_events([shown("b1", "champion", pair, 2000), shown("b2", "challenger", pair, 2001)])
    # later batches: a click names only its request (found in Redis), a cart its variant and request too,
    # a purchase of the champion-only time, and an event of a request Redis never saw
    state.apply_events([new_event("click", "u", "i", "s", request_id="b2"),
                        new_event("add_to_cart", "u", "i", "s", request_id="b1", variant="champion"),
                        new_event("purchase", "u", "i", "s", request_id="a0", price=2.0),
                        new_event("click", "u", "i", "s", request_id="unknown")])
    assert state.ab_counts() == {"champion": {"impressions": 1, "carts": 1},
                                 "challenger": {"impressions": 1, "clicks": 1}}
    # (the pair's keys start like the solo tag's: they are not read as part of it)
    assert state.ab_counts(solo) == {"champion": {"impressions": 5, "purchases": 1}}
    assert state.ab_comparisons() == [(pair, 2000, 2001), (solo, 1000, 1004)]
    # impressions logged before they named their versions count under the experiment's name
    state.apply_events([new_event("impression", "u", None, "s", items=["i"], request_id="c1", variant="champion"),
                        new_event("click", "u", "i", "s", request_id="c1")])
    assert state.ab_counts(name) == {"champion": {"impressions": 1, "clicks": 1}}
    # a tag stamped minutes ahead (the schema allows clock skew) is not "the latest comparison" until then
    import time

    now = int(time.time() * 1000)
    state.apply_events([shown("f1", "champion", f"{name}@champion.9", now + 290_000)])
    folded = int(time.time() * 1000)
    while int(time.time() * 1000) <= folded:  # the next fold is a later millisecond
        pass
    state.apply_events([shown("d1", "champion", pair, now + 1000)])
    assert state.ab_comparisons()[0][0] == pair


def test_a_click_that_reaches_kafka_before_its_impression_waits_for_it(redis_client, monkeypatch):
    """The API sends impressions every 100 ms; a shop's click sent sooner reached Kafka first. With only a
    request_id it was dropped from the A/B counts, with its variant too it went under the bare experiment name."""
    from pipelines import state as state_mod

    name = f"exp-{uuid.uuid4().hex[:6]}"
    state = OnlineState(redis_client, experiment=name)
    pair = f"{name}@champion.1:challenger.2"

    def shown(rid, variant):
        return new_event("impression", "u", None, "s", items=["i"], request_id=rid, variant=variant, experiment=pair)

    for scan_all in (2_000, 0):  # few requests waiting: all read; many: only the batch's looked up
        monkeypatch.setattr(state_mod, "_AB_WAIT_SCAN_ALL", scan_all)
        r1, r2 = f"r1-{scan_all}", f"r2-{scan_all}"
        before = state.ab_counts(pair)
        state.apply_events([new_event("click", "u", "i", "s", request_id=r1),
                            new_event("add_to_cart", "u", "i", "s", request_id=r2, variant="challenger"),
                            new_event("click", "u", "i", "s", request_id=r2, variant="challenger")])
        assert state.ab_counts(pair) == before and state.ab_counts(name) == {}  # nothing counted yet, nowhere
        assert state.ab_attribution_gaps() == {"waiting": 2}
        state.apply_events([shown(r1, "champion"), shown(r2, "challenger"), new_event("view", "u", "i", "s")])
        after = state.ab_counts(pair)
        assert after["champion"]["clicks"] - before.get("champion", {}).get("clicks", 0) == 1
        assert after["challenger"]["clicks"] - before.get("challenger", {}).get("clicks", 0) == 1
        assert after["challenger"]["carts"] - before.get("challenger", {}).get("carts", 0) == 1
        assert state.ab_counts(name) == {} and state.ab_attribution_gaps() == {"waiting": 0}
        assert not redis_client.exists(RedisKeys.ab_waiting_actions(r1), RedisKeys.ab_waiting_actions(r2))

    # an impression that never comes: after AB_WAIT_S the action is counted as unattributed, not in any variant
    monkeypatch.setattr(state_mod, "AB_WAIT_S", 0)
    state.apply_events([new_event("purchase", "u", "i", "s", request_id="never", price=2.0)])
    folded = int(time.time() * 1000)
    while int(time.time() * 1000) <= folded:  # the next fold is a later millisecond
        pass
    counts = state.ab_counts(pair)
    state.apply_events([new_event("view", "u", "i", "s")])
    assert state.ab_attribution_gaps() == {"purchase": 1, "waiting": 0} and state.ab_counts(pair) == counts
    # given up on, but its impression did reach Redis (folded by another consumer): counted in its comparison
    state.apply_events([new_event("click", "u", "i", "s", request_id="late")])
    redis_client.set(RedisKeys.request("late"), f"challenger {pair}")
    folded = int(time.time() * 1000)
    while int(time.time() * 1000) <= folded:
        pass
    clicks = state.ab_counts(pair)["challenger"]["clicks"]
    state.apply_events([new_event("view", "u", "i", "s")])
    assert state.ab_counts(pair)["challenger"]["clicks"] == clicks + 1
    assert state.ab_attribution_gaps() == {"purchase": 1, "waiting": 0}
    assert not redis_client.exists(RedisKeys.ab_waiting_actions("late"))
    # the A/B page says what no comparison counts
    from pipelines import dashboard_data as dd

    assert dd.fetch_snapshot(state).ab_gaps == {"purchase": 1, "waiting": 0}
    assert dd.attribution_gap_note({"purchase": 1, "click": 3, "waiting": 0}) == (
        "Left out of every comparison: 3 clicks, 1 purchase that named a request_id whose impression did not reach "
        f"Kafka within {state_mod.AB_WAIT_S // 60} minutes (the API's impression buffer was full, or the shop sent a request_id it did not get "
        "from /recommend).")
    assert dd.attribution_gap_note({"waiting": 1}) == (
        "Waiting for their impression: the clicks, carts or purchases of 1 request (sent before the API's impression "
        f"reached Kafka); they count once it does, for up to {state_mod.AB_WAIT_S // 60} minutes.")
    assert dd.attribution_gap_note({"waiting": 0}) is None and dd.attribution_gap_note({}) is None
