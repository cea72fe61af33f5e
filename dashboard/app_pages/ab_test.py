"""A/B test: per-variant rates with intervals, the challenger's lift, a split check and a plain verdict."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd
from pipelines.state import STATS_TTL_S

ui.sidebar()
st.title("A/B test")


def interval(lo: float, hi: float, fmt) -> str:
    return "–" if pd.isna(lo) else f"{fmt(lo)} – {fmt(hi)}"


def money(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:,.3f}"


def served_now(snap) -> None:
    """Which versions the API serves now for each arm of the comparison: a comparison is named by the versions
    ``train_job`` trained, while the Overview shows the registry's versions, hourly refreshes included."""
    arms = dd.comparison_arms(snap.ab_tag)
    if not arms:
        return
    serving = snap.serving_status
    others = [serving[v] for v, n in arms if serving.get(v) and serving[v] != n]
    known = dd.served_lineage(serving)  # what the API reports; MLflow only for an API that reports none
    note = dd.served_arms_note(snap.ab_tag, serving,
                               known if all(v in known for v in others) else ui.trained_versions(others))
    st.caption(f"Served now: {note}."
               + (" A comparison is named by each arm's *trained* version: the hourly refresh registers a new "
                  "version of each arm (fresher neighbours and trending, the same embeddings) that continues the "
                  "comparison, and the Overview shows those registered versions." if others else ""))


def render() -> None:
    s = ui.settings()
    cfg = ui.ab_config()
    snap = ui.snapshot()
    if snap is None:
        return
    if snap.ab_comparisons:
        # labels that do not change while a comparison runs (a changed label resets the widget's choice)
        labels = {tag: dd.comparison_label(tag, first) for tag, first, _ in snap.ab_comparisons}
        seen = {tag: (first, last) for tag, first, last in snap.ab_comparisons}
        latest = snap.ab_comparisons[0][0]
        chosen = st.selectbox(
            "Comparison", ["", *labels], key="ab_comparison",  # "": follow the latest, whichever it is
            format_func=lambda t: f"the latest: {labels[latest]}" if t == "" else labels[t],
            help="Counts are kept per comparison: the experiment and the versions it served. A new challenger "
                 "(or champion) version starts a new comparison, so earlier versions and the champion's traffic "
                 "from before the challenger was served stay out of it.")
        if chosen and chosen != snap.ab_tag:
            snap = ui.snapshot(tag=chosen)
            if snap is None:
                return
        if snap.ab_tag in seen:
            st.caption(f"Impressions of this comparison: {dd.comparison_label(snap.ab_tag, *seen[snap.ab_tag])}.")
    served_now(snap)
    if not snap.ab_counts:
        ui.no_traffic("no impressions recorded for any variant")
        return
    lake = ui.lake_ab()
    if lake is not None:
        ui.skipped_files(lake.skipped, "revenue per impression and the split check")
        lake = lake.of(snap.ab_tag, cfg.experiment)
    revenue = None if lake is None else lake.revenue
    report = dd.ab_report(snap.ab_counts, revenue or {}, cfg, users=None if lake is None else lake.users)
    conf = f"{1 - cfg.alpha:.0%}"

    if report.verdict is None:
        st.info("Only one variant has traffic in this comparison, so there is nothing to compare. A challenger gets "
                "traffic once the registry's `challenger` alias names a version other than the champion's; "
                "comparisons that ended (after a promotion, say) stay in the list above.",
                icon=":material/compare_arrows:")
    else:
        v = report.verdict
        show = {"winner": st.success, "no difference yet": st.info}.get(v.kind, st.info)
        st.metric("Verdict", v.kind if v.kind != "winner" else f"winner: {v.winner}")
        show(v.message, icon=":material/gavel:")
        if report.srm is not None and report.srm.mismatch:
            obs = ", ".join(f"{k} {x:.1%}" for k, x in report.srm.observed_share.items())
            exp = ", ".join(f"{k} {x:.1%}" for k, x in report.srm.expected_share.items())
            st.error(f"**Sample-ratio mismatch**: the {report.srm_unit} split {obs}, but the configured split is {exp} "
                     f"(chi-square p = {report.srm.p_value:.2g} < {report.srm.threshold}). Assignment or logging is "
                     "broken, so do not trust the results above until it is fixed "
                     "(check `SHOPREC_AB_CHALLENGER_SHARE` and the serving logs).", icon=":material/warning:")

    st.subheader("Per variant")
    st.caption(f"Totals of this comparison (Redis counters). CTR = clicks / impressions, conversion = "
               f"purchases / impressions ({conf} Wilson intervals); revenue per impression = price × quantity of the "
               f"purchases attributed to each impression, from the last {s.dashboard_lake_hours} h of the lake "
               f"({conf} t interval).")
    if lake is not None:
        ui.lake_read_at(lake)
    gap = dd.attribution_gap_note(snap.ab_gaps)
    if gap:
        st.caption(gap)
    t = report.variants
    for variant, row in t.iterrows():
        c = st.columns(6)
        c[0].metric(f"{variant} impressions", f"{int(row.impressions):,}")
        c[1].metric(f"{variant} clicks", f"{int(row.clicks):,}")
        c[2].metric(f"{variant} CTR", dd.pct(row.ctr, 2), help=f"{conf} CI {interval(row.ctr_low, row.ctr_high, dd.pct)}")
        c[3].metric(f"{variant} purchases", f"{int(row.purchases):,}")
        c[4].metric(f"{variant} conversion", dd.pct(row.conversion, 2),
                    help=f"{conf} CI {interval(row.conversion_low, row.conversion_high, dd.pct)}")
        c[5].metric(f"{variant} revenue/impression", money(row.rpi),
                    help=f"{conf} CI {interval(row.rpi_low, row.rpi_high, money)}")
    table = pd.DataFrame({
        "impressions": t["impressions"], "clicks": t["clicks"],
        "CTR": t["ctr"].map(lambda x: dd.pct(x, 2)),
        f"CTR {conf} CI": [interval(a, b, lambda x: dd.pct(x, 2)) for a, b in zip(t.ctr_low, t.ctr_high)],
        "purchases": t["purchases"], "conversion": t["conversion"].map(lambda x: dd.pct(x, 2)),
        f"conversion {conf} CI": [interval(a, b, lambda x: dd.pct(x, 2))
                                  for a, b in zip(t.conversion_low, t.conversion_high)],
        "revenue/impression": t["rpi"].map(money),
        f"revenue/impression {conf} CI": [interval(a, b, money) for a, b in zip(t.rpi_low, t.rpi_high)],
    })
    st.dataframe(table)
    if revenue is not None and not revenue:
        st.caption("No impressions in the lake yet, so no revenue per impression.")

    if report.a is None:
        return
    st.subheader(f"Lift of {report.b} over {report.a}")
    lifts = report.lifts
    c = st.columns(3)
    for col, metric in zip(c, lifts.index):
        r = lifts.loc[metric]
        col.metric(f"{metric} lift", dd.pct(r.lift, 1),
                   help=f"{conf} CI {interval(r.low, r.high, lambda x: dd.pct(x, 1))}")
        col.caption("–" if pd.isna(r.p_value) else
                    f"{conf} CI {interval(r.low, r.high, lambda x: dd.pct(x, 1))} · p = {r.p_value:.3g}")
    st.caption("CTR and conversion: score test and interval of the ratio of two proportions (statsmodels); "
               "revenue per impression: Welch t-test. Two-sided, alpha "
               f"{cfg.alpha}; the verdict waits for the sample size planned for a {cfg.mde:.0%} change "
               f"(power {cfg.power:.0%}).")
    st.metric("CTR p-value", "–" if pd.isna(lifts.loc["CTR", "p_value"]) else f"{lifts.loc['CTR', 'p_value']:.3g}")
    if report.srm is not None:
        st.caption(f"Split check: {report.srm_unit} {', '.join(f'{k} {x:.1%}' for k, x in report.srm.observed_share.items())}"
                   f" vs configured {', '.join(f'{k} {x:.1%}' for k, x in report.srm.expected_share.items())} "
                   f"(chi-square p = {report.srm.p_value:.3g}).")

    st.subheader("Cumulative CTR lift over time")
    cum = ui.cumulative_lift(snap.ab_tag, report.a, report.b, STATS_TTL_S // 60, cfg.alpha)
    if cum is None:
        return
    if cum.empty:
        st.info("No per-minute counters yet (they are kept for 7 days).", icon=":material/hourglass_empty:")
        return
    df = cum.reset_index().rename(columns={"minute": "time"})
    base = alt.Chart(df).encode(x=ui.time_x("time", df["time"]))
    band = base.mark_area(opacity=0.25).encode(y=ui.share_y("low", [*df["low"], *df["high"]], "CTR lift"),
                                              y2="high:Q")
    line = base.mark_line().encode(y="lift:Q", tooltip=[alt.Tooltip("time:T"), alt.Tooltip("lift:Q", format=".1%"),
                                                         alt.Tooltip("low:Q", format=".1%"),
                                                         alt.Tooltip("high:Q", format=".1%")])
    zero = alt.Chart(pd.DataFrame({"y": [0]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    ui.altair((band + line + zero).properties(height=260))
    st.caption(f"Lift of {report.b}'s CTR over {report.a}'s on all traffic up to each moment, with its "
               f"{conf} interval. Early swings are normal; decide on the verdict above, not on this line.")


ui.live(render)
