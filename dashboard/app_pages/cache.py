"""Cache: hit rate of the per-user recommendation cache and how requests were served."""

import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd

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
        c[2].metric("Misses", f"{cache.misses:,}")
        ts = dd.cache_timeseries(snap.cache, minutes=snap.minutes, now_s=snap.now_s)
        st.line_chart((100 * ts["hit_rate"]).rename("hit rate %"))

    st.subheader("Requests by source")
    sources = dd.requests_by_source(snap.requests)
    if int(sources["requests"].sum()) == 0:
        ui.no_traffic(f"no recommendation requests in the last {snap.minutes} minutes")
        return
    c = st.columns(len(sources))
    for col, (source, row) in zip(c, sources.iterrows()):
        col.metric(f"From {source}", f"{int(row.requests):,}", help=f"{dd.pct(row.share)} of requests")
    st.bar_chart(dd.source_timeseries(snap.requests, minutes=snap.minutes, now_s=snap.now_s))


ui.live(render)
