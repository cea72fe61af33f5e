"""Sensors: retrain early on new events or drift; log why a validation or training run failed."""

from datetime import datetime, timezone

import dagster as dg

from orchestration.jobs import refresh_job, train_job, validate_job
from orchestration.resources import LakeResource
from pipelines import training, validation
from pipelines.settings import get_settings

_s = get_settings()


def _last_training(context: dg.SensorEvaluationContext) -> datetime:
    """When the model was last (re)trained: the cursor or the latest `trained_model` materialization."""
    times = [datetime.fromisoformat(context.cursor)] if context.cursor else []
    event = context.instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
    if event is not None:
        times.append(datetime.fromtimestamp(event.timestamp, tz=timezone.utc))
    return max(times) if times else datetime(1970, 1, 1, tzinfo=timezone.utc)


@dg.sensor(job=train_job, minimum_interval_seconds=_s.retrain_sensor_interval_s,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Retrain before the daily schedule when SHOPREC_RETRAIN_MIN_NEW_EVENTS events arrived since "
                       "the last training, or when the event mix drifts (PSI of event types or categories over "
                       "SHOPREC_DRIFT_PSI_THRESHOLD).")
def retrain_sensor(context: dg.SensorEvaluationContext, lake_store: LakeResource):
    s = get_settings()
    now = datetime.now(timezone.utc)
    since = _last_training(context)
    trigger = training.retrain_trigger(lake_store.path, since, now, min_new_events=s.retrain_min_new_events,
                                       psi_threshold=s.drift_psi_threshold, catalog=lake_store.catalog())
    if not trigger.fire:
        return dg.SkipReason(trigger.reason)
    context.update_cursor(now.isoformat())
    context.log.info(f"retraining early: {trigger.reason}")
    return dg.RunRequest(run_key=f"retrain-{now.isoformat()}", tags={"shoprec/trigger": trigger.reason[:200]})


@dg.run_failure_sensor(monitored_jobs=[validate_job, train_job, refresh_job],
                       default_status=dg.DefaultSensorStatus.RUNNING,
                       description="Writes to the failed run's log which expectations failed (with samples) when "
                                   "validation stopped it.")
def failure_sensor(context: dg.RunFailureSensorContext, lake_store: LakeResource):
    run = context.dagster_run
    partition = run.tags.get("dagster/partition")
    keys = [partition] if partition else [validation.CATALOG_KEY]
    lines = [f"run {run.run_id} of {run.job_name} failed: {context.failure_event.message}"]
    for key in keys:
        report = validation.read_report(lake_store.quality_path, key)
        # only a report this run wrote explains its failure (a refresh_job run reads an older catalog report)
        if report is not None and not report["success"] and report.get("dagster_run_id") == run.run_id:
            lines.append(validation.describe_report(report))
    message = "\n".join(lines)
    # the run's own event log, where a person looking at the failed run reads; the tick log keeps a copy
    context.instance.report_engine_event(message, dagster_run=run)
    context.log.error(message)
