"""The shop simulator: determinism, valid events, catalog shape, tastes, growth, backfill, closed loop, live pacing."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from pipelines import lake, simulator
from pipelines.schemas import EVENT_TYPES, CatalogItem, validate_event

T0 = 1_790_000_000_000  # a fixed "now" for reproducible histories
HOUR = 3_600_000


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return simulator.make_catalog(5000, seed=0, start_ms=T0 - 30 * 86_400_000)


@pytest.fixture(scope="module")
def history(catalog):
    """A simulator and 100k of its events (~3 days, no closed loop)."""
    sim = simulator.ShopSimulator(catalog, n_users=2000, seed=0)
    evs = list(sim.events(100_000, start_ms=T0 - 3 * 86_400_000, rate_eps=100_000 / (3 * 86_400)))
    return sim, pd.DataFrame(evs), evs


def fixed_recommender(items):
    calls = []

    def recommend(user_id):
        calls.append(user_id)
        return f"req-{len(calls)}", list(items), "champion", "7"

    recommend.calls = calls
    return recommend


# --- determinism and validity --------------------------------------------------------
def _behaviour(events: list[dict]) -> list[dict]:
    """The events without their ids: what a seed promises to repeat."""
    return [{k: v for k, v in e.items() if k not in ("event_id", "session_id")} for e in events]


def test_same_seed_same_behaviour_other_seed_other_behaviour(catalog):
    def run(seed, **kw):
        sim = simulator.ShopSimulator(catalog, n_users=500, seed=seed, **kw)
        return list(sim.events(3000, start_ms=T0, rate_eps=5.0))

    a, b, c = run(1), run(1), run(2)
    assert _behaviour(a) == _behaviour(b)
    assert _behaviour(a) != _behaviour(c)
    # the same sessions: the n-th distinct session of one run is the n-th of the other
    sessions = [list(dict.fromkeys(e["session_id"] for e in run_)) for run_ in (a, b)]
    pairs = dict(zip(*sessions))
    assert len(pairs) == len(sessions[0]) and [pairs[e["session_id"]] for e in a] == [e["session_id"] for e in b]
    # an explicit id_seed repeats the ids too (tests only)
    assert run(1, id_seed=9) == run(1, id_seed=9)
    assert simulator.make_catalog(300, seed=4, start_ms=T0).equals(simulator.make_catalog(300, seed=4, start_ms=T0))


def test_two_runs_with_the_same_seed_share_no_event_or_session_id(catalog, tmp_path):
    """Every run and backfill is seeded with 0 by the CLI: their ids must still never meet (a restarted simulator
    reused the backfill's ids, and the consumer sent thousands of live events to the DLQ as ``duplicate``)."""
    def run():
        return list(simulator.ShopSimulator(catalog, n_users=500, seed=0).events(3000, start_ms=T0, rate_eps=5.0))

    a, b = run(), run()
    assert _behaviour(a) == _behaviour(b)
    ids_a, ids_b = {e["event_id"] for e in a}, {e["event_id"] for e in b}
    assert len(ids_a) == len(a) and len(ids_b) == len(b) and not ids_a & ids_b
    assert not {e["session_id"] for e in a} & {e["session_id"] for e in b}
    for ev in a[:50]:  # still valid version-4 UUIDs
        assert str(uuid.UUID(ev["event_id"])) == ev["event_id"] and uuid.UUID(ev["event_id"]).version == 4

    # a backfill, then a second one into the same lake (a `make up` after `make down`): every event_id unique
    lake_dir = tmp_path / "lake"
    for _ in range(2):
        simulator.ShopSimulator(catalog, n_users=500, seed=0, new_item_rate=0).backfill(
            lake_dir, days=1, events_per_day=3000, end_ms=T0, chunk_size=5000)
    df = lake.read_all(lake_dir)
    assert len(df) > 5000 and df["event_id"].is_unique


def test_every_event_validates_and_ids_are_unique(history):
    _, df, evs = history
    now = int(df["ts"].max())
    for ev in evs:
        validate_event(ev, now_ms=now)
    assert df["event_id"].is_unique
    assert set(df["event_type"]) <= set(EVENT_TYPES)
    assert df["ts"].is_monotonic_increasing
    assert {"view", "add_to_cart", "purchase"} <= set(df["event_type"])
    bought = df[df["event_type"] == "purchase"]
    assert (bought["price"] > 0).all() and (bought["quantity"] >= 1).all()


def test_funnel_rates_and_session_spacing(history):
    _, df, _ = history
    n = df["event_type"].value_counts()
    assert 0.06 < n["add_to_cart"] / n["view"] < 0.14
    assert 0.3 < n["purchase"] / n["add_to_cart"] < 0.5
    gaps = df.sort_values(["session_id", "ts"]).groupby("session_id")["ts"].diff().dropna() / 1000
    assert 5 < gaps.median() < 60 and gaps.max() <= 600
    assert 3 < len(df) / df["session_id"].nunique() < 10


# --- catalog, popularity and tastes --------------------------------------------------
def test_catalog_shape(catalog):
    assert len(catalog) >= 5000
    assert list(catalog.columns) == ["item_id", "title", "category", "brand", "price", "created_at", "in_stock"]
    assert catalog["item_id"].is_unique and catalog["item_id"].str.fullmatch(r"i\d{5}").all()
    assert 15 <= catalog["category"].nunique() <= 25
    assert 60 <= catalog["brand"].nunique() <= 120
    assert (catalog["price"] > 0).all() and (catalog["created_at"] <= T0 - 30 * 86_400_000).all()
    assert catalog["in_stock"].mean() > 0.9
    # titles are made of brand + words (category nouns, adjectives, colours)
    row = catalog.iloc[0]
    assert row["title"].startswith(row["brand"] + " ") and len(row["title"].split()) >= 4
    for rec in catalog.to_dict("records"):
        CatalogItem.model_validate(rec)
    # prices differ by category (lognormal around a per-category median)
    med = catalog.groupby("category")["price"].median()
    assert med.max() / med.min() > 20


def test_popularity_is_power_law(history, catalog):
    _, df, _ = history
    views = df.loc[df["event_type"] == "view", "item_id"].value_counts()
    top = views.iloc[: len(catalog) // 10].sum()
    assert top / views.sum() > 0.4


def test_hidden_tastes_are_concentrated_and_learnable(history):
    sim, df, _ = history
    cats = sim.catalog.set_index("item_id")["category"]
    views = df[df["event_type"] == "view"]
    fav = {u: set(sim.user_taste(u)["categories"]) for u in views["user_id"].unique()}
    inside = [c in fav[u] for u, c in zip(views["user_id"], cats.loc[views["item_id"]].to_numpy())]
    assert 0.65 < sum(inside) / len(inside) < 0.9

    # hold out each user's last new item: "popular in your categories" must beat global popularity
    inter = df[df["event_type"].isin(["view", "add_to_cart", "purchase"])]
    last = inter.drop_duplicates(["user_id", "item_id"]).groupby("user_id").tail(1)
    seen_n = inter.groupby("user_id")["item_id"].nunique()
    last = last[last["user_id"].map(seen_n) >= 4]
    train = inter.drop(inter.index[inter.set_index(["user_id", "item_id"]).index.isin(
        last.set_index(["user_id", "item_id"]).index)])
    train = train.assign(category=cats.loc[train["item_id"]].to_numpy())
    pop = train["item_id"].value_counts().index.tolist()
    by_cat = {c: g["item_id"].value_counts().index.tolist() for c, g in train.groupby("category")}
    user_cats = train.groupby(["user_id", "category"]).size().sort_values(ascending=False)
    user_cats = {u: list(zip(g.index.get_level_values(1), g / g.sum()))
                 for u, g in user_cats.groupby(level=0, sort=False)}
    seen = train.groupby("user_id")["item_id"].agg(set)
    hit_pop = hit_taste = 0
    for u, target in zip(last["user_id"], last["item_id"]):
        s = seen[u]
        hit_pop += target in [i for i in pop[:100] if i not in s][:10]
        recs: list[str] = []
        for c, share in user_cats[u]:
            recs += [i for i in by_cat[c][:50] if i not in s][: max(1, round(10 * share))]
        hit_taste += target in recs[:10]
    assert len(last) > 500
    assert hit_taste > 1.5 * hit_pop, (hit_taste, hit_pop)


# --- growth ----------------------------------------------------------------------
def test_new_items_and_new_users_arrive_and_get_views(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=1000, seed=3, new_item_rate=20.0, new_user_rate=0.1)
    start = T0 - 12 * HOUR
    df = pd.DataFrame(sim.events(20_000, start_ms=start, rate_eps=1.0))
    new = pd.DataFrame(sim.new_items)
    assert len(new) > 50
    cat_now = sim.catalog
    assert len(cat_now) == len(catalog) + len(new)
    assert set(new["item_id"]) <= set(cat_now["item_id"]) and cat_now["item_id"].is_unique
    assert new["item_id"].str.fullmatch(r"i\d{5}").all()
    assert new["created_at"].between(start, df["ts"].max()).all() and new["created_at"].is_monotonic_increasing
    for rec in new.to_dict("records"):
        CatalogItem.model_validate(rec)
    views = df[df["event_type"] == "view"].merge(new[["item_id", "created_at"]], on="item_id")
    assert (views["ts"] >= views["created_at"]).all()
    assert views["item_id"].nunique() >= 0.5 * len(new)
    users = df["user_id"].unique()
    assert sum(int(u[1:]) > 1000 for u in users) > 50
    assert all(re.fullmatch(r"u\d{6}", u) for u in users)


def test_users_keep_their_taste_across_simulators(catalog):
    a = simulator.ShopSimulator(catalog, n_users=10, seed=5)
    b = simulator.ShopSimulator(catalog, n_users=10, seed=5)
    b._add_user()  # u000011 created later in b is the same person as in a fresh simulator with more users
    c = simulator.ShopSimulator(catalog, n_users=11, seed=5)
    assert a.user_taste("u000003") == b.user_taste("u000003")
    assert b.user_taste("u000011") == c.user_taste("u000011")
    assert 1 <= len(a.user_taste("u000001")["categories"]) <= 3


# --- backfill ----------------------------------------------------------------------
def test_backfill_writes_readable_parquet(tmp_path, catalog, caplog):
    sim = simulator.ShopSimulator(catalog, n_users=500, seed=0, new_item_rate=5.0)
    lake_dir = tmp_path / "lake"
    catalog_path = tmp_path / "catalog.parquet"
    with caplog.at_level("INFO", logger="shoprec.simulator"):
        n = sim.backfill(lake_dir, days=1, events_per_day=12_000, end_ms=T0, chunk_size=5000,
                         catalog_path=catalog_path)
    df = lake.read_all(lake_dir)
    assert len(df) == n and 0.85 * 12_000 < n < 1.15 * 12_000
    assert df["event_id"].is_unique
    ts = (df["ts"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    assert ts.min() >= T0 - 86_400_000 and ts.max() < T0
    assert 24 <= len(lake.partitions(lake_dir)) <= 25  # hourly partitions (T0 is not on the hour)
    assert sum("events/s" in r.getMessage() for r in caplog.records) >= 2  # a progress line per chunk
    saved = pd.read_parquet(catalog_path)
    assert len(saved) == len(catalog) + len(sim.new_items) and len(sim.new_items) > 0
    assert set(df["item_id"].dropna()) <= set(saved["item_id"])


def test_load_or_make_catalog(tmp_path):
    path = tmp_path / "lake" / "catalog.parquet"
    made = simulator.load_or_make_catalog(path, seed=1, n_items=200)
    assert path.exists()
    again = simulator.load_or_make_catalog(path, seed=99, n_items=10)
    pd.testing.assert_frame_equal(made, again)


# --- closed loop -----------------------------------------------------------------------
def test_closed_loop_impressions_and_attributed_clicks(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=500, seed=0)
    shown = catalog["item_id"].tolist()[:10]
    rec = fixed_recommender(shown)
    sessions = [sim.step_with_recommender(rec, ts_ms=T0 + k * 1000) for k in range(300)]
    assert len(rec.calls) == 300
    clicks = []
    for evs in sessions:
        first = evs[0]
        assert first["event_type"] == "impression" and first["items"] == shown and first["item_id"] is None
        assert first["request_id"] and first["variant"] == "champion" and first["model_version"] == "7"
        assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
        assert len({e["session_id"] for e in evs}) == 1
        for e in evs:
            validate_event(e, now_ms=evs[-1]["ts"])
        for e in evs[1:]:
            if e.get("request_id") is not None:
                assert e["request_id"] == first["request_id"] and e["variant"] == "champion"
        clicks += [(e, first) for e in evs if e["event_type"] == "click"]
    assert 20 < len(clicks) < 150
    assert all(e["item_id"] in shown and e["request_id"] == f["request_id"] for e, f in clicks)
    # position bias: the top half of the list gets more clicks than the bottom half
    pos = Counter(shown.index(e["item_id"]) < 5 for e, _ in clicks)
    assert pos[True] > pos[False]


def test_a_service_that_logs_its_impressions_gets_no_second_one(catalog):
    """The BentoML service logs each answer's impression itself; the simulated shop must not send another one
    (it counted every list twice in the A/B test), while its clicks still carry the list's request."""
    shown = catalog["item_id"].tolist()[:10]
    rec = fixed_recommender(shown)
    rec.logs_impressions = True
    sim = simulator.ShopSimulator(catalog, n_users=500, seed=0)
    evs = [e for k in range(300) for e in sim.step_with_recommender(rec, ts_ms=T0 + k * 1000)]
    assert len(rec.calls) == 300 and not any(e["event_type"] == "impression" for e in evs)
    clicks = [e for e in evs if e["event_type"] == "click"]
    assert clicks and all(e["request_id"] and e["variant"] == "champion" for e in clicks)
    stream = pd.DataFrame(simulator.ShopSimulator(catalog, n_users=500, seed=0).events(
        3000, start_ms=T0, rate_eps=10.0, recommend_fn=rec, loop_share=0.3))
    assert len(stream) == 3000 and (stream["event_type"] == "impression").sum() == 0
    assert stream["request_id"].notna().sum() > 0
    assert simulator.http_recommend_fn("http://127.0.0.1:1").logs_impressions


def test_closed_loop_rewards_lists_that_match_taste(catalog):
    def ctr(pick):
        sim = simulator.ShopSimulator(catalog, n_users=300, seed=11)
        by_cat = catalog.groupby("category")["item_id"].apply(list)

        def recommend(user_id):
            return "r", pick(sim, user_id, by_cat), "v", None

        evs = [e for _ in range(400) for e in sim.step_with_recommender(recommend, ts_ms=T0)]
        n = Counter(e["event_type"] for e in evs)
        return n["click"] / n["impression"]

    matched = ctr(lambda sim, u, by_cat: by_cat[sim.user_taste(u)["categories"][0]][:10])
    unmatched = ctr(lambda sim, u, by_cat: by_cat[next(c for c in by_cat.index
                                                       if c not in sim.user_taste(u)["categories"])][:10])
    assert matched > 1.5 * unmatched


def test_no_answer_or_failing_recommender_means_browsing(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=100, seed=0)

    def broken(user_id):
        raise RuntimeError("service down")

    for fn in (lambda u: None, broken, lambda u: ("r", [], "v", None)):
        evs = sim.step_with_recommender(fn, ts_ms=T0)
        assert evs and evs[0]["event_type"] == "view"
        assert not any(e.get("request_id") for e in evs)


def test_events_with_recommender_uses_the_closed_loop_for_a_share_of_sessions(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=500, seed=0)
    rec = fixed_recommender(catalog["item_id"].tolist()[:10])
    df = pd.DataFrame(sim.events(5000, start_ms=T0, rate_eps=10.0, recommend_fn=rec, loop_share=0.3))
    share = (df["event_type"] == "impression").sum() / df["session_id"].nunique()
    assert 0.2 < share < 0.4
    assert len(rec.calls) == (df["event_type"] == "impression").sum()


# --- live ------------------------------------------------------------------------------
def test_run_live_honours_the_rate_roughly(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=500, seed=0)
    batches: list[list[dict]] = []
    rec = fixed_recommender(catalog["item_id"].tolist()[:10])
    t = time.monotonic()
    counts = sim.run_live(batches.append, rate_eps=200, duration_s=1.0, recommend_fn=rec)
    took = time.monotonic() - t
    events = [e for b in batches for e in b]
    assert 0.9 < took < 10  # it stops at duration_s (the upper bound allows a busy machine)
    assert counts["events"] == len(events)
    assert 100 < len(events) < 400  # ~200 expected; a wide band, not a timing test
    assert len(batches) >= 5  # small batches every ~100 ms
    assert counts["recommend_calls"] == len(rec.calls) > 0 and counts["impression"] > 0
    now = int(time.time() * 1000)
    for e in events:
        validate_event(e, now_ms=now)
        assert e["ts"] <= now


def test_run_live_stops_on_event(catalog):
    sim = simulator.ShopSimulator(catalog, n_users=100, seed=0)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    t = time.monotonic()
    counts = sim.run_live(lambda evs: None, rate_eps=50, duration_s=None, stop_event=stop)
    assert time.monotonic() - t < 1.5
    assert counts["events"] > 0


# --- the service as a recommend_fn ---------------------------------------------------------
class _FakeService(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/recommend" or body["user_id"] == "u-broken":
            self.send_response(500)
            self.end_headers()
            return
        out = {"request_id": "req-1", "variant": "challenger", "model_version": "3", "source": "model",
               "items": [{"item_id": f"i{j:05d}", "score": 1.0 / j} for j in range(1, body["k"] + 1)]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_recommend_fn():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        fn = simulator.http_recommend_fn(f"http://127.0.0.1:{server.server_port}/", timeout=2.0)
        assert fn("u000001") == ("req-1", [f"i{j:05d}" for j in range(1, 11)], "challenger", "3")
        assert fn("u-broken") is None
    finally:
        server.shutdown()
        server.server_close()
    assert simulator.http_recommend_fn(f"http://127.0.0.1:{server.server_port}", timeout=0.5)("u1") is None


def test_the_simulator_gives_as_many_events_as_asked(history):
    # its speed is measured by the benchmarks that generate with it (`shoprec bench quality --dataset synthetic-1m`)
    _, df, _ = history
    assert len(df) == 100_000
