"""Assets: lake partition (validated) → training interactions → trained model (MLflow) → fallback list."""


from datetime import datetime, timedelta, timezone

import dagster as dg

from orchestration.partitions import hourly_events
from orchestration.resources import LakeResource, MLflowResource, RedisResource
from pipelines import lake, training, validation
from pipelines.settings import TrainConfig, get_settings

OWNERS = ["team:shoprec-ml"]


@dg.asset(
    group_name="ingestion", partitions_def=hourly_events, owners=OWNERS, kinds={"parquet", "greatexpectations"},
    check_specs=[dg.AssetCheckSpec("events_suite", asset="events", blocking=True,
                                   description="Great Expectations suite expectations/events.json")],
    description="One hour of shop events from the Parquet lake, validated by Great Expectations.",
)
def events(context: dg.AssetExecutionContext, lake_store: LakeResource):
    key = context.partition_key
    df = lake.read_partition(lake_store.path, key)
    start = datetime.strptime(key, "%Y-%m-%d-%H:%M").replace(tzinfo=timezone.utc)
    report = validation.validate_events(df, hour_start=start, hour_end=start + timedelta(hours=1))
    context.log.info(report.summary())
    yield dg.MaterializeResult(metadata={
        "rows": len(df), "users": int(df.user_id.nunique()) if len(df) else 0,
        "folder": str(lake.partition_dir(lake_store.path, key)),
    })
    yield dg.AssetCheckResult(check_name="events_suite", passed=report.success,
                              severity=dg.AssetCheckSeverity.ERROR, metadata=report.to_metadata())


class WindowConfig(dg.Config):
    days: int = 7


@dg.asset(group_name="features", deps=[events], owners=OWNERS, kinds={"pandas"},
          description="Weighted user-item interactions of the last `days` days of the lake.")
def training_interactions(context: dg.AssetExecutionContext, config: WindowConfig, lake_store: LakeResource):
    end = datetime.now(timezone.utc) + timedelta(hours=1)
    df = training.build_interactions(lake.read_window(lake_store.path, end - timedelta(days=config.days), end))
    context.add_output_metadata({
        "rows": len(df), "users": int(df.user_id.nunique()), "items": int(df.item_id.nunique()),
        "window_days": config.days,
        "date_range": f"{df.ts.min()} .. {df.ts.max()}" if len(df) else "empty",
    })
    return df


class TrainAssetConfig(dg.Config):
    model: str = "bpr"
    epochs: int = 15
    dim: int = 64


@dg.asset(group_name="training", owners=OWNERS, kinds={"pytorch", "mlflow"},
          description="A recommender trained on the window, logged and registered in MLflow; "
                      "alias `champion` when it is the first or beats the current champion.")
def trained_model(context: dg.AssetExecutionContext, config: TrainAssetConfig, training_interactions,
                  mlflow_registry: MLflowResource) -> dg.MaterializeResult:
    cfg = get_settings().train.model_copy(update={"model": config.model, "epochs": config.epochs, "dim": config.dim})
    result = training.train(training_interactions, cfg)
    reg = training.register_and_gate(mlflow_registry.registry(), result, min_improvement=cfg.min_improvement,
                                     extra_tags={"dagster_run_id": context.run_id})
    return dg.MaterializeResult(metadata={
        "model_version": reg.version, "mlflow_run_id": reg.run_id, "promoted_to_champion": reg.promoted,
        "decision": reg.reason, "fit_seconds": round(result.fit_s, 2), "n_train": result.n_train,
        **{k: dg.MetadataValue.float(v) for k, v in result.metrics.items()},
    })


@dg.asset(group_name="serving", deps=[trained_model], owners=OWNERS, kinds={"redis"},
          description="Popular items written to Redis: what serving answers when no model can.")
def popular_fallback(context: dg.AssetExecutionContext, training_interactions,
                     redis_state: RedisResource) -> dg.MaterializeResult:
    items = training.popular_items(training_interactions, k=get_settings().fallback_k)
    redis_state.state().set_popular_fallback(items)
    return dg.MaterializeResult(metadata={"items": len(items), "top_5": str([i for i, _ in items[:5]])})
