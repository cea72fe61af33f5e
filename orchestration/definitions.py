"""The one Dagster ``Definitions`` of shoprec (``dagster dev -w workspace.yaml``)."""

import dagster as dg

from orchestration import assets
from orchestration.partitions import hourly_events
from orchestration.resources import KafkaResource, LakeResource, MLflowResource, RedisResource

validate_job = dg.define_asset_job("validate_events_job", selection=dg.AssetSelection.assets(assets.events),
                                   partitions_def=hourly_events,
                                   description="Validate one hour of lake events (Great Expectations).")
train_job = dg.define_asset_job(
    "train_job",
    selection=dg.AssetSelection.assets(assets.training_interactions, assets.trained_model, assets.popular_fallback),
    description="Build training data, train, register in MLflow, refresh the fallback list.",
)

# the retraining cadence: validate each hour as it closes, retrain daily (see README, "Cadence")
hourly_validation = dg.build_schedule_from_partitioned_job(validate_job, minute_of_hour=5)
daily_retrain = dg.ScheduleDefinition(job=train_job, cron_schedule="30 3 * * *", execution_timezone="UTC",
                                      default_status=dg.DefaultScheduleStatus.STOPPED)

defs = dg.Definitions(
    assets=[assets.events, assets.training_interactions, assets.trained_model, assets.popular_fallback],
    jobs=[validate_job, train_job],
    schedules=[hourly_validation, daily_retrain],
    resources={
        "lake_store": LakeResource(),
        "redis_state": RedisResource(),
        "mlflow_registry": MLflowResource(),
        "kafka": KafkaResource(),
    },
)
