"""shoprec dashboard: ``streamlit run dashboard/streamlit_app.py`` (``make up`` starts it on :8501)."""

import streamlit as st

st.set_page_config(page_title="shoprec", page_icon=":material/insights:", layout="wide")

pages = [
    st.Page("app_pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("app_pages/ab_test.py", title="A/B test", icon=":material/science:"),
    st.Page("app_pages/cold_start.py", title="Cold start", icon=":material/ac_unit:"),
    st.Page("app_pages/cache.py", title="Cache", icon=":material/bolt:"),
    st.Page("app_pages/data_quality.py", title="Data quality", icon=":material/fact_check:"),
]
st.navigation(pages).run()
