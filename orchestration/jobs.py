"""Asset jobs: validate one hour, retrain, refresh."""

import dagster as dg

from orchestration import assets
from orchestration.partitions import hourly_events

validate_job = dg.define_asset_job(
    "validate_events_job", selection=dg.AssetSelection.assets(assets.events, assets.dashboard_summaries),
    partitions_def=hourly_events,
    description="Validate one hour of lake events (Great Expectations, blocking check), then summarise it for the "
                "dashboard.")
train_job = dg.define_asset_job(
    "train_job",
    selection=dg.AssetSelection.assets(assets.catalog, assets.training_interactions, assets.trained_model,
                                       assets.popular_fallback, assets.served_model),
    description="Validate the catalog, build training data from validated partitions, train, evaluate against "
                "the champion, register in MLflow, warm the cache, refresh the fallback list.",
)
refresh_job = dg.define_asset_job(
    "refresh_job", selection=dg.AssetSelection.assets(assets.trending, assets.itemitem_refresh),
    description="Hourly incremental refresh: trending items in Redis, and the item-to-item neighbours and trending "
                "of the champion/challenger from the recent validated partitions (a new MLflow version that takes "
                "over the alias when not worse).")
