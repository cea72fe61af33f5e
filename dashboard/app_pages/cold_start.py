"""Cold start: how many requests come from users with no history, and how they are served."""

import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd

ui.sidebar()
st.title("Cold start")


def render() -> None:
    snap = ui.snapshot()
    if snap is None:
        return
    summary = dd.cold_start_summary(snap.requests)
    st.caption(f"Last {snap.minutes} minutes. A request is *cold* when its user has no history at all; "
               "it is served from the user's current session, or trending items when the session has no "
               "clicks yet. Counted when the model answers (a repeat within the cache TTL is a cache hit).")
    if summary.requests == 0:
        ui.no_traffic(f"no recommendation requests in the last {snap.minutes} minutes")
        return
    c = st.columns(4)
    c[0].metric("Requests", f"{summary.requests:,}")
    c[1].metric("From new users", dd.pct(summary.cold_share), help=f"{summary.cold:,} requests")
    c[2].metric("New users served from session", dd.pct(summary.session_share),
                help=f"{summary.from_session:,} requests")
    c[3].metric("New users served trending", dd.pct(summary.trending_share),
                help=f"{summary.from_trending:,} requests")

    ts = dd.cold_start_timeseries(snap.requests, minutes=snap.minutes, now_s=snap.now_s)
    st.markdown("**New-user requests per minute**, by how they were served")
    st.bar_chart(ts[[dd.COLD_USER_SESSION, dd.COLD_USER_TRENDING]].rename(
        columns={dd.COLD_USER_SESSION: "session", dd.COLD_USER_TRENDING: "trending"}))
    st.markdown("**Share of requests from new users** per minute (%)")
    st.line_chart((100 * ts["cold_share"]).rename("new-user share %"))


ui.live(render)
