"""Data quality: the latest Great Expectations results per lake partition, failures with examples."""

import streamlit as st

from dashboard import ui
from pipelines import dashboard_data as dd

ui.sidebar()
st.title("Data quality")


def render() -> None:
    s = ui.settings()
    reports = ui.quality_reports()
    if not reports:
        st.info(f"No validation results in `{s.quality_dir}` yet. Dagster validates each hourly lake partition "
                "(`make up` starts it) and writes one report per partition there.", icon=":material/hourglass_empty:")
        return
    table = dd.quality_table(reports, s.dagster_url)
    failed = int((table["status"] != "passed").sum())
    c = st.columns(3)
    c[0].metric("Partitions validated", f"{len(table):,}")
    c[1].metric("Partitions failing", f"{failed:,}")
    hours = [p for p in table.index if p[:1].isdigit()]  # hourly keys; the catalog and unreadable files are not
    c[2].metric("Latest partition", hours[0] if hours else "none yet")
    if failed:
        st.error(f"{failed} partition(s) fail validation: their data may be kept out of training. "
                 "The failing expectations and examples are below; the Dagster run has the details.",
                 icon=":material/error:")
    else:
        st.success("Every validated partition passes its expectations.", icon=":material/check_circle:")
    st.dataframe(table, column_config={"dagster_run": st.column_config.LinkColumn("Dagster run",
                                                                                  display_text="open run")})
    fails = dd.failing_expectations(reports)
    if not fails.empty:
        st.subheader("Failing expectations")
        st.dataframe(fails, hide_index=True)
    errors = [r for r in reports if r.get("error")]
    for r in errors:
        st.warning(r["error"], icon=":material/broken_image:")


ui.live(render)
