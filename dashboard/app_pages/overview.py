"""Overview: events flowing in, the stream consumer, the dead-letter queue, the models and serving latency."""

import time
from datetime import datetime, timezone

import altair as alt
import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION

ui.sidebar()
st.title("Overview")


def models() -> None:
    st.subheader("Models")
    aliases = ui.model_aliases()
    if aliases is None:
        return
    snap = ui.snapshot(quiet=True)  # the Serving section below says when Redis is down
    cols = st.columns(2)
    for col, alias in zip(cols, (ALIAS_CHAMPION, ALIAS_CHALLENGER)):
        info = aliases.get(alias)
        with col:
            if snap is not None:  # what the API serves: the registry's alias moves first, serving follows
                text, alarming = dd.served_note(alias, info.version if info else None, snap.serving_status,
                                                now_s=snap.now_s)
                if alarming:
                    st.warning(text, icon=":material/sync_problem:")
            if info is None:
                st.metric(alias.capitalize(), "none")
                st.caption(f"No `{ui.settings().mlflow_model_name}@{alias}` in the registry: "
                           + ("training registers one (`shoprec train`, or Dagster's `train_job`)."
                              if alias == ALIAS_CHAMPION else "all traffic goes to the champion."))
                continue
            age = time.time() - info.created_ms / 1000 if info.created_ms else None
            st.metric(alias.capitalize(), f"v{info.version}", help="registered model version")
            lines = []
            if info.created_ms:
                created = datetime.fromtimestamp(info.created_ms / 1000, tz=timezone.utc)
                lines.append(f"registered {created:%Y-%m-%d %H:%M} UTC ({dd.fmt_age(age)} ago)")
            lines += dd.model_lines(info)  # the data it saw and its quality metrics on its own holdout
            if snap is not None and not alarming:
                lines.insert(0, text)
            st.caption(" · ".join(lines) if lines else "no metrics recorded on this version")
            others = dd.other_figures(info)  # timings, sizes, the refreshed version's score: no quality of its own
            if others:
                st.caption("Also logged (not quality metrics of this version): " + " · ".join(others))
    if sum(bool(a and a.metrics) for a in aliases.values()) > 1:
        st.caption("Each version's metrics come from the holdout at the end of its own window (its training window, "
                   "or for a refresh the refresh's window), so two versions compare only on the same holdout: a "
                   "trained challenger's line gives the champion's score on its holdout, a refresh's line the score "
                   "of the version it refreshed; the A/B test page compares them on live traffic.")


def traffic() -> None:
    snap = ui.snapshot()
    if snap is None:
        return
    st.subheader("Serving")
    lat = dd.latency_summary(snap.latency)
    rps = dd.requests_per_second(snap.requests, now_s=snap.now_s)
    c = st.columns(3)
    c[0].metric("Requests/s", f"{rps:,.2f}", help="mean over the last 5 complete minutes")
    c[1].metric("p50 latency", dd.fmt_ms(lat.loc["all", "p50_ms"]),
                help=f"last {snap.minutes} minutes; upper edge of the histogram bucket")
    c[2].metric("p99 latency", dd.fmt_ms(lat.loc["all", "p99_ms"]))
    if int(lat.loc["all", "requests"]):
        shown = lat.assign(p50=lat["p50_ms"].map(dd.fmt_ms), p99=lat["p99_ms"].map(dd.fmt_ms))
        st.dataframe(shown[["requests", "p50", "p99"]])
    else:
        ui.no_traffic(f"no `/recommend` latency recorded in the last {snap.minutes} minutes")

    st.subheader("Events per minute")
    ev = dd.events_timeseries(snap.events, minutes=snap.minutes, now_s=snap.now_s)
    if int(ev.to_numpy().sum()) == 0:
        st.info(f"No events consumed in the last {snap.minutes} minutes. The stream consumer counts them "
                "(`make up` starts it and a simulated shop).", icon=":material/hourglass_empty:")
    else:
        st.metric("Events (window)", f"{int(ev.to_numpy().sum()):,}", help=f"last {snap.minutes} minutes")
        done = ev.iloc[:-1]  # the minute in progress would end the curve in a cliff that reads as lost events
        long = done.reset_index().melt("minute", var_name="event type", value_name="events")
        ui.altair(alt.Chart(long).mark_area().encode(
            x=ui.time_x("minute", long["minute"]), y=ui.count_y("events", done.sum(axis=1), stack=True),
            color="event type:N",
            tooltip=["minute:T", "event type:N", "events:Q"]).properties(height=220))
        st.caption("Whole minutes; the minute in progress is counted in the total above, not drawn.")

    st.subheader("Ingestion")
    consumer = dd.consumer_summary(snap.consumer_status, now_s=snap.now_s)
    if consumer is None:
        st.info("The stream consumer has not reported yet (`make up` starts it).", icon=":material/hourglass_empty:")
    else:
        c = st.columns(4)
        c[0].metric("Consumer lag (records)", "–" if consumer.lag is None else f"{consumer.lag:,}")
        c[1].metric("Rate (events/s)", "–" if consumer.rate_eps is None else f"{consumer.rate_eps:,.1f}")
        c[2].metric("Last commit", "–" if consumer.last_commit_ago_s is None
                    else f"{dd.fmt_age(consumer.last_commit_ago_s)} ago")
        c[3].metric("Last report", "–" if consumer.updated_ago_s is None
                    else f"{dd.fmt_age(consumer.updated_ago_s)} ago")
        if consumer.stale:
            st.warning("The stream consumer has not reported for over a minute: it may be down "
                       "(`make status`; `make up` restarts it).", icon=":material/warning:")
        elif consumer.idle_members:
            st.warning(f"{consumer.idle_members} of {consumer.members} stream consumers own no partition, so they "
                       "consume nothing (more consumers than the topic has partitions, or the group is "
                       "rebalancing); the lag counts the others' partitions only.", icon=":material/warning:")
        elif consumer.members and consumer.members > 1:
            st.caption(f"{consumer.members} stream consumers share the partitions; lag and rate are their sums.")
    catalog = dd.catalog_line(snap.catalog_status, now_s=snap.now_s, dlq_reasons=snap.dlq_reasons)
    st.caption(catalog or "Catalog feed: no product change applied yet (`shoprec catalog sync` applies what the "
                          "shop sends to `shop.catalog`; `make up` starts it).")
    dlq = dd.dlq_table(snap.dlq_reasons)
    if dlq.empty:
        st.caption("Dead-letter queue: no rejected records.")
    else:
        duplicates = int(dlq["records"].get("duplicate", 0))
        c = st.columns(2)
        c[0].metric("Refused records", f"{int(dlq['records'].sum()) - duplicates:,}",
                    help="records the consumer or the catalog feed refused as invalid (in the dead-letter topic): "
                         "what sends them needs fixing")
        c[1].metric("Duplicates dropped", f"{duplicates:,}",
                    help="events whose event_id was stored before: a client's retry after a 503 or a timeout, or a "
                         "replay. Expected with at-least-once delivery; nothing is lost")
        st.dataframe(dlq)
        st.caption("Per reason. `shoprec dlq` shows the newest records with their error and the record as sent "
                   "(`--reason R` for one reason).")


ui.live(models)
ui.live(traffic)
