"""The one Dagster ``Definitions`` of shoprec (``dagster dev -w workspace.yaml``).

Cadence (README, "Cadence"): every closed hour is validated (``validate_events_job_schedule``);
trending and the served models' item-to-item part are refreshed hourly (``refresh_job_schedule``,
``SHOPREC_REFRESH_CRON``, ``SHOPREC_REFRESH_WINDOW_HOURS``); the full
retrain runs daily (``train_job_schedule``, ``SHOPREC_RETRAIN_CRON``) and earlier when
``retrain_sensor`` sees enough new events or a drifted event mix.
"""

from datetime import timedelta, timezone

import dagster as dg

from orchestration import assets, sensors
from orchestration.jobs import refresh_job, train_job, validate_job
from orchestration.resources import KafkaResource, LakeResource, MLflowResource, RedisResource
from pipelines.settings import get_settings

_s = get_settings()
#: `make up` runs the cadence (SHOPREC_CADENCE_ON); anywhere else the schedules start stopped until turned on
_SCHEDULES = dg.DefaultScheduleStatus.RUNNING if _s.cadence_on else dg.DefaultScheduleStatus.STOPPED


@dg.schedule(job=validate_job, cron_schedule="5 * * * *", execution_timezone="UTC",
             name="validate_events_job_schedule", default_status=_SCHEDULES,
             description="Validate each hour of the lake five minutes after it closed.")
def hourly_validation(context: dg.ScheduleEvaluationContext):
    closed = context.scheduled_execution_time.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    key = (closed - timedelta(hours=1)).strftime("%Y-%m-%d-%H:00")
    return dg.RunRequest(run_key=key, partition_key=key)


daily_retrain = dg.ScheduleDefinition(name="train_job_schedule", job=train_job, cron_schedule=_s.retrain_cron,
                                      execution_timezone="UTC", default_status=_SCHEDULES,
                                      description="Full retrain on the training window (SHOPREC_RETRAIN_CRON).")
hourly_refresh = dg.ScheduleDefinition(name="refresh_job_schedule", job=refresh_job, cron_schedule=_s.refresh_cron,
                                       execution_timezone="UTC", default_status=_SCHEDULES,
                                       description="Incremental refresh of trending items and of the champion's/"
                                                   "challenger's item-to-item part (SHOPREC_REFRESH_CRON).")

defs = dg.Definitions(
    assets=[assets.catalog, assets.events, assets.dashboard_summaries, assets.training_interactions, assets.trained_model,
            assets.itemitem_refresh, assets.popular_fallback, assets.served_model, assets.trending],
    jobs=[validate_job, train_job, refresh_job],
    schedules=[hourly_validation, daily_retrain, hourly_refresh],
    sensors=[sensors.retrain_sensor, sensors.failure_sensor],
    resources={
        "lake_store": LakeResource(),
        "redis_state": RedisResource(),
        "mlflow_registry": MLflowResource(),
        "kafka": KafkaResource(),
    },
)
