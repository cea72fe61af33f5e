"""The Definitions load, and every job, schedule and sensor resolves (project_fully_featured pattern)."""

from __future__ import annotations

import os

import dagster as dg

from orchestration import assets
from orchestration.definitions import defs


def test_definitions_load_and_every_job_schedule_and_sensor_resolves():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert {"train_job", "validate_events_job", "refresh_job"} <= jobs
    for name in jobs:
        assert repo.get_job(name).graph is not None
    schedules = {s.name: s for s in repo.schedule_defs}
    assert set(schedules) >= {"validate_events_job_schedule", "train_job_schedule", "refresh_job_schedule"}
    assert schedules["train_job_schedule"].cron_schedule == "30 3 * * *"
    assert schedules["refresh_job_schedule"].cron_schedule == "10 * * * *"
    for s in schedules.values():
        assert repo.get_job(s.job_name)
    sensors = {s.name: s for s in repo.sensor_defs}
    assert {"retrain_sensor", "failure_sensor", "default_automation_condition_sensor"} <= set(sensors)
    assert sensors["retrain_sensor"].job_name == "train_job"
    refresh = {k.to_user_string() for k in repo.get_job("refresh_job").asset_layer.executable_asset_keys}
    assert refresh == {"trending", "itemitem_refresh"}
    assert schedules["refresh_job_schedule"].job_name == "refresh_job"


def test_asset_graph_has_groups_owners_kinds_and_policies():
    graph = defs.resolve_asset_graph()
    groups = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        groups.setdefault(node.group_name, set()).add(key.to_user_string())
        assert node.owners == ["team:shoprec-ml"], key
        assert node.kinds, key
        assert node.description, key
    assert groups == {"ingestion": {"catalog", "events"}, "features": {"training_interactions", "dashboard_summaries"},
                      "training": {"trained_model", "itemitem_refresh"}, "serving": {"popular_fallback", "served_model", "trending"}}
    served = graph.get(dg.AssetKey("served_model"))
    assert served.freshness_policy is not None
    assert served.automation_condition is not None
    checks = {spec.name: spec for a in (assets.events, assets.catalog) for spec in a.check_specs}
    assert checks[assets.EVENTS_CHECK].blocking and checks[assets.CATALOG_CHECK].blocking
    events = graph.get(dg.AssetKey("events"))
    assert isinstance(events.partitions_def, dg.HourlyPartitionsDefinition)


def test_hourly_schedule_validates_the_hour_that_just_closed():
    from datetime import datetime, timezone

    from orchestration.definitions import hourly_validation

    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 24, 14, 5, tzinfo=timezone.utc),
                                    repository_def=defs.get_repository_def())
    [request] = hourly_validation.evaluate_tick(ctx).run_requests
    assert request.partition_key == "2026-11-24-13:00"


def test_make_up_runs_the_cadence_and_elsewhere_schedules_wait_to_be_turned_on(settings, monkeypatch):
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.stack import programs

    monkeypatch.delenv("SHOPREC_CADENCE_ON", raising=False)
    dagster = next(p for p in programs(settings, Path.cwd()) if p.name == "dagster")
    assert dagster.env["SHOPREC_CADENCE_ON"] == "true"
    probe = ("from orchestration.definitions import defs; r = defs.get_repository_def(); "
             "print(sorted((s.name, s.default_status.value) for s in [*r.schedule_defs, *r.sensor_defs]))")
    for on, status in (("true", "RUNNING"), ("false", "STOPPED")):
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "SHOPREC_CADENCE_ON": on},
                             capture_output=True, text=True, check=True).stdout
        got = dict(ast.literal_eval(out))
        assert {got[n] for n in ("validate_events_job_schedule", "train_job_schedule", "refresh_job_schedule")} == {status}
        assert got["retrain_sensor"] == "STOPPED"  # 50,000 events is under an hour of the local simulator
        assert got["failure_sensor"] == "RUNNING"


def test_make_up_names_what_holds_a_port_it_needs_and_starts_nothing(tmp_path):
    """Another server on the dashboard's port answered the port check, so `make up` called the dashboard running
    while Streamlit retried forever behind it."""
    import http.server
    import threading

    from pipelines import localstack
    from pipelines.stack import Program, port_conflicts, probe

    port = localstack.free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dashboard = Program("dashboard", ["streamlit"], f"http://localhost:{port}",
                            f"http:http://127.0.0.1:{port}/_stcore/health")
        assert not probe(dashboard)  # a 404 from someone else's server is not the dashboard's health
        [line] = port_conflicts([dashboard, Program("consumer", ["shoprec"], "(consumer)", "proc")])
        assert f"port {port} (dashboard) is in use by pid {os.getpid()}" in line and "make up" in line
    finally:
        server.shutdown()
        server.server_close()
    assert port_conflicts([dashboard]) == []
