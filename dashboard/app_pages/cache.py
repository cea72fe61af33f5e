"""Cache: hit rate of the per-user recommendation cache, by variant, latency of hits and misses, Redis memory."""

from datetime import datetime, timezone

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd
from pipelines.schemas import SOURCE_CACHE, SOURCE_FALLBACK, SOURCE_MODEL

ui.sidebar()
st.title("Cache")


def render() -> None:
    snap = ui.snapshot()
    if snap is None:
        return
    st.caption(f"Last {snap.minutes} minutes.")
    cache = dd.cache_summary(snap.cache)
    st.subheader("Hit rate")
    if cache.lookups == 0:
        ui.no_traffic(f"no cache lookups in the last {snap.minutes} minutes")
    else:
        c = st.columns(3)
        c[0].metric("Hit rate", dd.pct(cache.hit_rate))
        c[1].metric("Hits", f"{cache.hits:,}")
        c[2].metric("Misses", f"{cache.misses:,}",
                    help="answered by the model, or by the fallback when no model could answer in time")
        # complete minutes only: the minute in progress would swing the line's end on its first few lookups
        ts = dd.cache_timeseries(snap.cache, minutes=snap.minutes, now_s=snap.now_s).reset_index()
        ui.altair(alt.Chart(ts).mark_line(point=True).encode(
            x=ui.time_x("minute", ts["minute"]), y=ui.share_y("hit_rate", ts["hit_rate"], "hit rate"),
            tooltip=["minute:T", "hit:Q", "miss:Q", alt.Tooltip("hit_rate:Q", format=".1%")]).properties(height=200))
        running = dd.cache_in_progress(snap.cache, now_s=snap.now_s)
        started = datetime.fromtimestamp(dd.minute_in_progress(snap.now_s), tz=timezone.utc)
        st.caption(f"Hit rate per complete minute. The minute in progress ({started:%H:%M} UTC, "
                   f"{running.lookups:,} lookups so far) counts in the totals above and joins the line when it ends.")
        by_variant = dd.cache_by_variant(snap.cache)
        if not by_variant.empty:
            st.markdown("**Hit rate by variant**")
            c = st.columns(len(by_variant))
            for col, (variant, row) in zip(c, by_variant.iterrows()):
                col.metric(f"{variant} hit rate", dd.pct(row.hit_rate),
                           help=f"{int(row.hits):,} hits, {int(row.misses):,} misses")

    st.subheader("Latency of hits and misses")
    lat = dd.latency_summary(snap.latency)
    hit, miss = lat.loc[SOURCE_CACHE], lat.loc[SOURCE_MODEL]
    fallback = int(lat.loc[SOURCE_FALLBACK].requests)
    if int(hit.requests) + int(miss.requests) == 0 and fallback:
        st.warning(f"No answer came from the cache or a model in the last {snap.minutes} minutes: all {fallback:,} "
                   "requests got the fallback list. Either no model is registered yet (run `train_job` in Dagster) "
                   "or the scorer fails: see `/status` and `var/log/bentoml.log`.", icon=":material/warning:")
    elif int(hit.requests) + int(miss.requests) == 0:
        ui.no_traffic(f"no `/recommend` latency recorded in the last {snap.minutes} minutes")
    else:
        c = st.columns(4)
        c[0].metric("Hit p50", dd.fmt_ms(hit.p50_ms))
        c[1].metric("Hit p99", dd.fmt_ms(hit.p99_ms))
        c[2].metric("Miss p50", dd.fmt_ms(miss.p50_ms), help="requests scored by the model")
        c[3].metric("Miss p99", dd.fmt_ms(miss.p99_ms))
        hists = pd.concat({"hit (cache)": dd.latency_histogram(snap.latency.get(SOURCE_CACHE, {})),
                           "miss (model)": dd.latency_histogram(snap.latency.get(SOURCE_MODEL, {}))},
                          names=["kind"]).rename("requests").reset_index()
        # the last bucket has no upper edge: "> 1000", not "inf"
        labels = {f: f"> {dd.LATENCY_FIELDS[-2]}" if f == "inf" else f for f in dd.LATENCY_FIELDS}
        hists["le_ms"] = hists["le_ms"].map(labels)
        ui.altair(alt.Chart(hists).mark_bar(opacity=0.7).encode(
            x=alt.X("le_ms:N", sort=list(labels.values()), title="latency ≤ ms"),
            y=ui.count_y("requests", hists["requests"], "requests"),
            color="kind:N", xOffset="kind:N").properties(height=200))

    st.subheader("Requests by source")
    sources = dd.requests_by_source(snap.requests)
    if int(sources["requests"].sum()) == 0:
        ui.no_traffic(f"no recommendation requests in the last {snap.minutes} minutes")
    else:
        c = st.columns(len(sources))
        for col, (source, row) in zip(c, sources.iterrows()):
            col.metric(f"From {source}", f"{int(row.requests):,}", help=f"{dd.pct(row.share)} of requests")


def memory() -> None:
    st.subheader("Redis")
    info = ui.redis_info(quiet=True)  # the page's first section says when Redis is down
    if info is None:
        st.caption("Memory and key counts are read from Redis, which does not answer.")
        return
    c = st.columns(3)
    c[0].metric("Memory used", dd.fmt_bytes(info.used_memory),
                help="no limit (maxmemory 0)" if not info.maxmemory else f"maxmemory {dd.fmt_bytes(info.maxmemory)}")
    c[1].metric("Keys", f"{info.keys:,}")
    c[2].metric("Key families", f"{len(info.keys_by_family):,}")
    if info.keys_by_family:
        st.dataframe(pd.DataFrame({"keys": info.keys_by_family}).rename_axis("family"))
        if not info.scanned_all:
            st.caption("Counts by family come from the first keys scanned; the total above is exact.")


ui.live(render)
ui.live(memory)
