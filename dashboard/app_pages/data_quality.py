"""Data quality: the latest Great Expectations results per lake partition, failures with examples."""

import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd

ui.sidebar()
st.title("Data quality")

RUN_LINK = {"dagster_run": st.column_config.LinkColumn("Dagster run", display_text="open run")}


def render() -> None:
    s = ui.settings()
    reports = ui.quality_reports()
    if not reports:
        st.info(f"No validation results in `{s.quality_dir}` yet. Dagster validates each hourly lake partition "
                "(`make up` starts it) and writes one report per partition there.", icon=":material/hourglass_empty:")
        return
    hours, catalog = dd.split_quality_reports(reports)
    table = dd.quality_table(hours, s.dagster_url)
    done = table[~table["status"].isin(dd.NOT_VALIDATED)]  # the open hour is checked once it closes
    failed = int((done["status"] != "passed").sum())
    c = st.columns(3)
    c[0].metric("Partitions validated", f"{len(done):,}", help="closed hours; the catalog is shown below")
    c[1].metric("Partitions failing", f"{failed:,}")
    latest = [p for p in done.index if p[:1].isdigit()]  # hourly keys; unreadable report files are not
    c[2].metric("Latest partition", latest[0] if latest else "none yet")
    if failed:
        st.error(f"{failed} partition(s) fail validation: their data may be kept out of training. "
                 "The failing expectations and examples are below; the Dagster run has the details.",
                 icon=":material/error:")
    elif len(done):
        st.success("Every validated partition passes its expectations.", icon=":material/check_circle:")
    if len(done) < len(table):
        st.caption(f"An hour still being written is *{dd.QUALITY_OPEN}*; one that closed but has only a report "
                   f"from while it was open is *{dd.QUALITY_PENDING}* (the hourly schedule runs five minutes after "
                   "the hour). Neither counts above.")
    st.dataframe(table, column_config=RUN_LINK)
    skipped = done[done["skipped"].notna()]
    if len(skipped):  # a suite that did not run must not read as one that passed
        key = skipped.index[0]
        st.info(f"{len(skipped)} of {len(done)} validated partition(s) skipped a suite (column *skipped*); "
                f"the latest, {key}: {skipped.loc[key, 'skipped']}.", icon=":material/skip_next:")
    fails = dd.failing_expectations([r for r in hours if str(r.get("partition")) in done.index])
    if not fails.empty:
        st.subheader("Failing expectations")
        st.dataframe(fails, hide_index=True)
    for r in hours:
        if r.get("error"):
            st.warning(r["error"], icon=":material/broken_image:")
    catalog_section(catalog)


def catalog_section(report) -> None:
    st.subheader("Catalog")
    if report is None:
        st.caption("The product catalog has not been validated yet.")
        return
    row = dd.quality_table([report], ui.settings().dagster_url)
    if row["skipped"].isna().all():  # the catalog has one suite, never skipped: not a "None" column
        row = row.drop(columns="skipped")
    status = row["status"].iloc[0]
    if status != "error":  # an unreadable report says so below
        (st.success if status == "passed" else st.error)(
            f"The product catalog {'passes' if status == 'passed' else 'fails'} its expectations "
            f"(validated {report.get('validated_at') or 'at an unknown time'}).",
            icon=":material/check_circle:" if status == "passed" else ":material/error:")
    st.dataframe(row, column_config=RUN_LINK)
    if report.get("error"):
        st.warning(report["error"], icon=":material/broken_image:")
    fails = dd.failing_expectations([report])
    if not fails.empty:
        st.dataframe(fails, hide_index=True)

ui.live(render)
