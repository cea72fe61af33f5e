"""A/B and traffic: per-variant CTR and conversion, the CTR z-test, the models behind the aliases, ingestion."""

from datetime import datetime, timezone

import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, REGISTERED_MODEL

ui.sidebar()
st.title("A/B and traffic")


def models() -> None:
    st.subheader("Models")
    aliases = ui.model_aliases()
    if aliases is None:
        return
    cols = st.columns(2)
    for col, alias in zip(cols, (ALIAS_CHAMPION, ALIAS_CHALLENGER)):
        info = aliases.get(alias)
        with col:
            if info is None:
                st.metric(alias.capitalize(), "none")
                st.caption(f"No `{REGISTERED_MODEL}@{alias}` in the registry yet."
                           + (" Training registers one (Dagster job in `make up`)." if alias == ALIAS_CHAMPION
                              else " All traffic goes to the champion."))
                continue
            st.metric(alias.capitalize(), f"v{info.version}")
            lines = []
            if info.created_ms:
                created = datetime.fromtimestamp(info.created_ms / 1000, tz=timezone.utc)
                lines.append(f"registered {created:%Y-%m-%d %H:%M} UTC")
            lines += [f"{k} {v:.4f}" for k, v in sorted(info.metrics.items())]
            if lines:
                st.caption(" · ".join(lines))


def variants() -> None:
    st.subheader("Variants")
    snap = ui.snapshot()
    if snap is None:
        return
    if not snap.ab_counts:
        ui.no_traffic("no impressions recorded for any variant")
    else:
        table = dd.ab_table(snap.ab_counts)
        st.caption("Totals since the experiment started. CTR = clicks / impressions, "
                   "conversion = purchases / impressions.")
        for variant, row in table.iterrows():
            c = st.columns(5)
            c[0].metric(f"{variant} impressions", f"{int(row.impressions):,}")
            c[1].metric(f"{variant} clicks", f"{int(row.clicks):,}")
            c[2].metric(f"{variant} CTR", dd.pct(row.ctr, 2))
            c[3].metric(f"{variant} purchases", f"{int(row.purchases):,}")
            c[4].metric(f"{variant} conversion", dd.pct(row.conversion, 2))

        test = dd.ctr_ztest(snap.ab_counts)
        if test is None:
            st.info("Only one variant has traffic, so there is nothing to compare yet. A challenger gets "
                    "traffic once the registry has a `challenger` alias.", icon=":material/compare_arrows:")
        else:
            st.markdown(f"**CTR test** ({test.b} vs {test.a}, two-proportion z-test, two-sided)")
            c = st.columns(3)
            c[0].metric("p-value", f"{test.p_value:.3g}")
            c[1].metric("z", f"{test.z:.2f}")
            c[2].metric(f"CTR lift of {test.b}", dd.pct(test.lift, 1) if test.lift is not None else "–")
            (st.success if test.significant else st.info)(test.verdict)

    ts = dd.ab_timeseries(snap.ab_minutes, minutes=snap.minutes, now_s=snap.now_s)
    st.markdown(f"**Impressions and clicks per minute**, last {snap.minutes} minutes")
    if ts.empty or int(ts.to_numpy().sum()) == 0:
        ui.no_traffic(f"no impressions or clicks in the last {snap.minutes} minutes")
    else:
        st.line_chart(ts)

    st.subheader("Ingestion")
    consumer = dd.consumer_summary(snap.consumer_status, now_s=snap.now_s)
    if consumer is None:
        st.info("The stream consumer has not reported yet (`make up` starts it).", icon=":material/hourglass_empty:")
    else:
        c = st.columns(4)
        c[0].metric("Consumer lag (records)", "–" if consumer.lag is None else f"{consumer.lag:,}")
        c[1].metric("Rate (events/s)", "–" if consumer.rate_eps is None else f"{consumer.rate_eps:,.1f}")
        c[2].metric("Consumed", "–" if consumer.consumed is None else f"{consumer.consumed:,}")
        c[3].metric("Last report", "–" if consumer.updated_ago_s is None else f"{consumer.updated_ago_s:,.0f} s ago")
        if consumer.stale:
            st.warning("The stream consumer has not reported for over a minute: it may be down "
                       "(`make status`; `make up` restarts it).", icon=":material/warning:")
    dlq = dd.dlq_table(snap.dlq_reasons)
    if dlq.empty:
        st.caption("Dead-letter queue: no rejected records.")
    else:
        st.markdown(f"**Dead-letter queue**: {int(dlq['records'].sum()):,} rejected records by reason")
        st.dataframe(dlq)


ui.live(models)
ui.live(variants)
