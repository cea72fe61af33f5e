"""Cold start: requests from users with no history and how they are served; how new products get shown."""

import altair as alt
import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd

ui.sidebar()
st.title("Cold start")


def users() -> None:
    st.subheader("New users")
    snap = ui.snapshot()
    if snap is None:
        return
    summary = dd.cold_start_summary(snap.requests)
    st.caption(f"Last {snap.minutes} minutes. A request is *cold* when the model has never seen its user; it is "
               "served from the user's current session when it has a click the model can use (a product added "
               "since training counts through its nearest products by content), else trending items. Only "
               "requests the model answered are looked at: a cache hit or the fallback is not.")
    if summary.scored == 0 and summary.requests == 0:
        ui.no_traffic(f"no recommendation requests in the last {snap.minutes} minutes")
        return
    if summary.scored == 0:
        st.info(f"No recommendation request was answered by the model in the last {snap.minutes} minutes "
                f"({summary.requests:,} came from the cache or the fallback): a user is looked at when the model "
                "scores their request. With no champion yet every answer is the fallback: run `train_job` in "
                "Dagster.", icon=":material/hourglass_empty:")
        return
    c = st.columns(4)
    c[0].metric("Requests answered by the model", f"{summary.scored:,}",
                help=f"of {summary.requests:,} in all; the rest came from the cache or the fallback")
    c[1].metric("From new users", dd.pct(summary.cold_share),
                help=f"{summary.cold:,} of the {summary.scored:,} requests the model answered")
    c[2].metric("New users served from session", dd.pct(summary.session_share),
                help=f"{summary.from_session:,} requests")
    c[3].metric("New users served trending", dd.pct(summary.trending_share),
                help=f"{summary.from_trending:,} requests")

    ts = dd.cold_start_timeseries(snap.requests, minutes=snap.minutes, now_s=snap.now_s)
    served = ts[[dd.COLD_USER_SESSION, dd.COLD_USER_TRENDING]].rename(
        columns={dd.COLD_USER_SESSION: "session", dd.COLD_USER_TRENDING: "trending"})
    long = served.reset_index().melt("minute", var_name="served by", value_name="requests")
    st.markdown("**New-user requests per minute**, by how they were served")
    ui.altair(alt.Chart(long).mark_bar().encode(x=ui.time_x("minute", long["minute"]),
                                                y=ui.count_y("requests", served.sum(axis=1)),
                                                color="served by:N").properties(height=200))
    st.markdown("**Share of the model's requests from new users** per complete minute (the minute in progress "
                "counts in the figures above only)")
    share = dd.complete_minutes(ts[["cold_share"]], snap.now_s).reset_index()
    ui.altair(alt.Chart(share).mark_line(point=True).encode(
        x=ui.time_x("minute", share["minute"]), y=ui.share_y("cold_share", share["cold_share"], "new-user share"))
        .properties(height=180))


def products() -> None:
    s = ui.settings()
    st.subheader(f"New products (launched in the last {s.new_item_age_h:g} h)")
    rep = ui.new_items()
    if rep is False:
        return
    if rep is None:
        st.info(f"No catalog at `{s.catalog_path}` yet: the simulator or the catalog topic writes it "
                "(`make up`).", icon=":material/hourglass_empty:")
        return
    ui.skipped_files(rep.skipped, "the new-product numbers")
    ui.lake_read_at(rep)
    if rep.new_items == 0:
        st.info(f"No product was launched in the last {s.new_item_age_h:g} h.", icon=":material/hourglass_empty:")
    c = st.columns(5)
    c[0].metric("New products", f"{rep.new_items:,}")
    c[1].metric("Shown at least once", dd.pct(rep.impressed_share), help=f"{rep.with_impression:,} products")
    # only launches the stream saw: a backfilled product's wait measures when impressions began (see the caption)
    c[2].metric("Median time to first impression", dd.fmt_age(rep.median_first_impression_s),
                help=f"over the {rep.shown_in_window:,} products launched in the window and shown so far")
    c[3].metric("Median time to first click", dd.fmt_age(rep.median_first_click_s),
                help=f"over the {rep.clicked:,} products launched in the window and clicked so far")
    c[4].metric("Share of impression slots", dd.pct(rep.slot_share, 2),
                delta=None if rep.slot_share is None else f"{100 * (rep.slot_share - rep.explore_share):+.2f} pp vs budget",
                delta_color="off", help=f"exploration budget `explore_share` = {dd.pct(rep.explore_share)}")
    st.caption(dd.new_item_timing_note(rep))
    if rep.slot_share is not None and rep.slot_share > rep.explore_share * 1.2:
        st.warning(f"New products take {dd.pct(rep.slot_share)} of the recommendation slots, above the exploration "
                   f"budget of {dd.pct(rep.explore_share)}.", icon=":material/warning:")
    if rep.hourly.empty:
        st.caption("No impressions in the lake yet.")
        return
    st.markdown("**Share of impression slots given to new products**, per hour, against the budget")
    df = rep.hourly.reset_index()
    line = alt.Chart(df).mark_line(point=True).encode(
        x=ui.time_x("hour", df["hour"], min_step_ms=3_600_000),
        y=ui.share_y("new_share", [*df["new_share"], rep.explore_share], "new-product share"),
        tooltip=["hour:T", "slots:Q", "new_slots:Q", alt.Tooltip("new_share:Q", format=".2%")])
    budget = alt.Chart(df.assign(budget=rep.explore_share)).mark_rule(color="red", strokeDash=[4, 4]).encode(
        y="budget:Q")
    ui.altair((line + budget).properties(height=220), time_format="%d %b %H:%M")


ui.live(users)
ui.live(products)
