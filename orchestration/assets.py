"""Assets: catalog and hourly lake partitions (validated) → training interactions → trained model
(MLflow, evaluation gate) → served model (cache warm-up), fallback list, trending.

Every asset calls one ``pipelines`` function and reports what a person looks for.
No ``from __future__ import annotations`` here: Dagster inspects the ``context`` annotation.
"""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd

from orchestration.partitions import hourly_events
from orchestration.resources import LakeResource, MLflowResource, RedisResource
from pipelines import compaction, dashboard_agg, lake, refresh, training, validation
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, COL_ITEM, COL_TS, TAG_GX_SUCCESS
from pipelines.settings import get_settings

OWNERS = ["team:shoprec-ml"]
EVENTS_CHECK = "events_suite"
CATALOG_CHECK = "catalog_suite"


def _failure_row(f: dict) -> str:
    """One failed expectation as a row of the check's table: how many rows, and offending values or, for a file
    that does not fit the lake schema (or cannot be read), what is wrong with it."""
    if f.get("file"):
        rows = f.get("unexpected_count")
        return f"| {validation._label(f)} | {f'{rows} rows' if rows is not None else 'the whole file'} | " \
               f"{str(f.get('observed_value'))[:200]} |"
    unexpected = f.get("unexpected_count") if f.get("unexpected_count") is not None else \
        f.get("exception") or f.get("observed_value")
    return f"| {validation._label(f)} | {unexpected} | {', '.join(map(str, f.get('sample') or []))[:200]} |"


def _check_metadata(report: validation.ValidationReport, df: pd.DataFrame | None) -> dict:
    meta = report.to_metadata()
    rows = validation.sample_rows(df, report.failed) if df is not None and not report.success else []
    lines = ["| expectation | unexpected | sample or problem |", "|---|---|---|"]
    lines += [_failure_row(f) for f in report.failed]
    return {
        "success": report.success,
        "evaluated": report.evaluated,
        "failed_count": len(report.failed),
        "failed_expectations": dg.MetadataValue.json(meta["failed_expectations"]),
        "failures": dg.MetadataValue.md("\n".join(lines) if report.failed else "all expectations met"),
        "sample_rows": dg.MetadataValue.json(rows),
        "statistics": dg.MetadataValue.json(meta["statistics"]),
        "summary": dg.MetadataValue.text(report.summary()),
    }


def _known_items(catalog: pd.DataFrame | None) -> list[str] | None:
    return None if catalog is None else catalog[COL_ITEM].astype(str).tolist()


@dg.asset(
    group_name="ingestion", owners=OWNERS, kinds={"parquet", "greatexpectations"},
    check_specs=[dg.AssetCheckSpec(CATALOG_CHECK, asset="catalog", blocking=True,
                                   description="Great Expectations suite expectations/catalog.json")],
    description="The product catalog (var/lake/catalog.parquet, kept up to date from the shop.catalog topic by "
                "`shoprec catalog sync`), validated by Great Expectations; a broken catalog stops training.",
)
def catalog(context: dg.AssetExecutionContext, lake_store: LakeResource):
    df = lake_store.catalog()
    if df is None:
        context.log.warning(f"no catalog at {lake_store.catalog_file}: models train without item content")
        yield dg.MaterializeResult(metadata={"rows": 0, "path": lake_store.catalog_file})
        yield dg.AssetCheckResult(check_name=CATALOG_CHECK, passed=True,
                                  metadata={"note": "no catalog file yet; nothing to validate"})
        return
    report = validation.validate_catalog(df, path=lake_store.catalog_file)
    validation.write_report(report, validation.CATALOG_KEY, lake_store.quality_path, context.run_id)
    context.log.info(report.summary())
    yield dg.MaterializeResult(metadata={
        "rows": len(df), "categories": int(df["category"].nunique()), "path": lake_store.catalog_file,
    })
    yield dg.AssetCheckResult(check_name=CATALOG_CHECK, passed=report.success, description=report.summary(),
                              severity=dg.AssetCheckSeverity.ERROR, metadata=_check_metadata(report, df))


@dg.asset(
    group_name="ingestion", partitions_def=hourly_events, owners=OWNERS, kinds={"parquet", "greatexpectations"},
    check_specs=[dg.AssetCheckSpec(EVENTS_CHECK, asset="events", blocking=True,
                                   description="Great Expectations suites expectations/events*.json: schema, ids, "
                                               "event types, the partition's hour, prices, duplicates, unknown "
                                               "products, volume band")],
    description="One hour of shop events from the Parquet lake, validated by Great Expectations. The report is "
                "also written to var/quality/<partition>.json; training uses only partitions that passed.",
)
def events(context: dg.AssetExecutionContext, lake_store: LakeResource):
    key = context.partition_key
    s = get_settings()
    # first merge the hour's small consumer files (only those Kafka says are committed), so validation and every
    # later reader reads a few files; without Kafka nothing is merged and validation goes on as before
    try:
        compacted = compaction.compact_partition(lake_store.path, key, s)
        context.log.info(f"compaction: {compacted.summary()}")
    except OSError as err:  # e.g. a full disk: the hour stays as it is, validation goes on
        compacted = compaction.CompactionResult(lake.partition_dir(lake_store.path, key))
        context.log.warning(f"compaction of {key} failed ({err}); validating the files as they are")
    report, df = validation.validate_partition(
        lake_store.path, key, quality_dir=lake_store.quality_path, known_items=_known_items(lake_store.catalog()),
        band_factor=s.volume_band_factor, history_hours=s.volume_history_hours, dagster_run_id=context.run_id)
    context.log.info(report.summary())
    ts = pd.to_datetime(df[COL_TS], utc=True, errors="coerce") if len(df) and COL_TS in df else None
    yield dg.MaterializeResult(metadata={
        "rows": len(df),
        "users": int(df["user_id"].nunique()) if len(df) and "user_id" in df else 0,
        "date_range": f"{ts.min()} .. {ts.max()}" if ts is not None else "empty",
        "folder": dg.MetadataValue.path(str(lake.partition_dir(lake_store.path, key))),
        "quality_report": dg.MetadataValue.path(str(validation.report_path(lake_store.quality_path, key))),
        "validation_passed": report.success,
        "compacted_files": compacted.merged,
    })
    yield dg.AssetCheckResult(check_name=EVENTS_CHECK, passed=report.success, description=report.summary(),
                              severity=dg.AssetCheckSeverity.ERROR, metadata=_check_metadata(report, df))


@dg.asset(
    group_name="features", partitions_def=hourly_events, deps=[events], owners=OWNERS, kinds={"parquet", "streamlit"},
    description="The dashboard's per-hour summaries of one validated lake partition (A/B impressions and attributed "
                "purchases, new-product impressions and clicks), cached under var/dashboard-cache so the A/B and "
                "Cold start pages read a week in well under a second instead of scanning the raw lake.",
)
def dashboard_summaries(context: dg.AssetExecutionContext, lake_store: LakeResource) -> dg.MaterializeResult:
    s = get_settings()
    counts = dashboard_agg.summarize_partition(lake_store.path, dashboard_agg.cache_dir(s), s.catalog_path,
                                               context.partition_key, age_h=s.new_item_age_h)
    return dg.MaterializeResult(metadata={**{k: int(v) for k, v in counts.items()},
                                          "cache": dg.MetadataValue.path(str(dashboard_agg.cache_dir(s)))})


class WindowConfig(dg.Config):
    days: int | None = None  # None: Settings.train_window_days
    end: str | None = None  # ISO time; None: now (the window ends with the current hour)


def _window_end(end: str | None) -> datetime:
    """The exclusive end of a window that includes the hour of ``end`` (ISO time; None: now)."""
    return (datetime.fromisoformat(end) if end else datetime.now(timezone.utc)) + timedelta(hours=1)


@dg.asset(group_name="features", deps=[events, catalog], owners=OWNERS, kinds={"pandas"},
          description="Weighted user-item interactions of the training window (default the last 7 days), built "
                      "only from hourly partitions whose Great Expectations report passed.")
def training_interactions(context: dg.AssetExecutionContext, config: WindowConfig,
                          lake_store: LakeResource) -> pd.DataFrame:
    s = get_settings()
    days = config.days or s.train_window_days
    end = _window_end(config.end)
    window = training.load_window(lake_store.path, lake_store.quality_path, end - timedelta(days=days), end,
                                  known_items=_known_items(lake_store.catalog()),
                                  band_factor=s.volume_band_factor, history_hours=s.volume_history_hours,
                                  dagster_run_id=context.run_id)  # the report links the run that validated it
    df = training.build_interactions(window.events)
    context.add_output_metadata({
        "rows": len(df), "users": int(df.user_id.nunique()), "items": int(df.item_id.nunique()),
        "window_days": days,
        "date_range": f"{df.ts.min()} .. {df.ts.max()}" if len(df) else "empty",
        "partitions_used": len(window.passed),
        "duplicates_dropped": window.duplicates_dropped,  # redelivered events, counted once
        "partitions_left_out": dg.MetadataValue.json(window.failed),
        TAG_GX_SUCCESS: not window.failed, "failed_partitions": ",".join(window.failed),
        # per suite, on how many of the partitions used it ran / was skipped (the version's gx_suites tags)
        "suites_ran": dg.MetadataValue.json(window.suites_ran),
        "suites_skipped": dg.MetadataValue.json(window.suites_skipped),
    })
    return df


class TrainAssetConfig(dg.Config):
    """Overrides of ``Settings.train`` (None keeps the setting)."""

    model: str | None = None
    epochs: int | None = None
    dim: int | None = None


@dg.asset(group_name="training", owners=OWNERS, kinds={"pytorch", "mlflow"},
          description="A candidate trained on the window, evaluated against the champion on the same time-based "
                      "holdout (the last hours), logged and registered in MLflow as a new version of "
                      "shoprec-recommender; alias `challenger` when not worse than the champion by more than the "
                      "tolerance, `champion` when first or (SHOPREC_AUTO_PROMOTE) better by the margin.")
def trained_model(context: dg.AssetExecutionContext, config: TrainAssetConfig, training_interactions: pd.DataFrame,
                  lake_store: LakeResource, mlflow_registry: MLflowResource) -> dg.MaterializeResult:
    s = get_settings()
    cfg = s.train.model_copy(update={k: v for k, v in config.model_dump().items() if v is not None})
    result = training.train(training_interactions, cfg, items=lake_store.catalog(), holdout_hours=s.holdout_hours)
    upstream = context.instance.get_latest_materialization_event(dg.AssetKey("training_interactions"))
    up_meta = upstream.asset_materialization.metadata if upstream and upstream.asset_materialization else {}
    failed = up_meta.get("failed_partitions")
    suites = {k: up_meta[k].value if k in up_meta else None for k in ("suites_ran", "suites_skipped")}
    gx_tags = training.gx_tags(up_meta["partitions_used"].value if "partitions_used" in up_meta else "",
                               failed.value if failed else "", suites["suites_ran"], suites["suites_skipped"])
    reg = training.register_and_gate(mlflow_registry.registry(), result, tolerance=s.challenger_tolerance,
                                     margin=s.promote_margin, auto_promote=s.auto_promote,
                                     extra_tags={"dagster_run_id": context.run_id, **gx_tags})
    url = mlflow_registry.version_url(reg.version)
    return dg.MaterializeResult(metadata={
        "model_version": reg.version, "mlflow_run_id": reg.run_id, "alias": reg.alias or "none",
        "promoted_to_champion": reg.promoted, "decision": reg.reason,
        "champion_before": reg.champion_before or "none",
        "holdout": result.holdout, "holdout_ndcg": reg.candidate_score,
        "champion_holdout_ndcg": reg.champion_score if reg.champion_score is not None else float("nan"),
        "fit_seconds": round(result.fit_s, 2), "n_train": result.n_train, "n_test": result.n_test,
        "data_window": f"{result.window[0]} .. {result.window[1]}",
        **({"mlflow_url": dg.MetadataValue.url(url)} if url else {}),
        **{k: dg.MetadataValue.float(v) for k, v in result.metrics.items()},
    })


class RefreshConfig(dg.Config):
    hours: int | None = None  # None: Settings.refresh_window_hours
    end: str | None = None  # ISO time; None: now (the window ends with the current hour)


@dg.asset(group_name="training", deps=[events, catalog, trained_model], owners=OWNERS, kinds={"pytorch", "mlflow"},
          description="The hourly incremental refresh: the model behind `champion` (and `challenger`) gets its "
                      "item-to-item neighbours and trending recomputed from the last SHOPREC_REFRESH_WINDOW_HOURS "
                      "of validated partitions (embeddings and users unchanged), is scored on the gate's time-based "
                      "holdout next to the version it came from, registered in MLflow as a new version tagged "
                      "`refresh_of`, and takes over the alias only when not worse by more than the tolerance. "
                      "Does nothing until a first champion exists.")
def itemitem_refresh(context: dg.AssetExecutionContext, config: RefreshConfig, lake_store: LakeResource,
                     mlflow_registry: MLflowResource) -> dg.MaterializeResult:
    s = get_settings()
    hours = config.hours or s.refresh_window_hours
    end = _window_end(config.end)
    report = refresh.refresh_served(
        mlflow_registry.registry(), lake_store.path, lake_store.quality_path, end - timedelta(hours=hours), end,
        holdout_hours=s.holdout_hours, holdout_per_user=s.train.holdout_per_user, k=s.train.k,
        tolerance=s.challenger_tolerance, move_champion=s.refresh_moves_champion,
        extra_tags={"dagster_run_id": context.run_id}, known_items=_known_items(lake_store.catalog()),
        band_factor=s.volume_band_factor, history_hours=s.volume_history_hours, dagster_run_id=context.run_id)
    context.log.info(report.summary())
    meta: dict = {"note": report.note, "summary": dg.MetadataValue.md(report.summary()), "window_hours": hours,
                  "window_rows": report.window_rows,
                  "date_range": f"{report.window[0]} .. {report.window[1]}" if report.window else "empty",
                  "partitions_used": report.partitions_used,
                  "partitions_left_out": dg.MetadataValue.json(report.partitions_left_out),
                  "holdout": report.holdout or "none",
                  "aliases_moved": ",".join(a.alias for a in report.aliases if a.alias_moved) or "none"}
    for result in report.aliases:
        meta.update(result.metadata())
        url = mlflow_registry.version_url(result.version) if result.version else None
        if url:
            meta[f"{result.alias}_mlflow_url"] = dg.MetadataValue.url(url)
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name="serving", owners=OWNERS, kinds={"redis"},
          automation_condition=dg.AutomationCondition.eager(),
          description="Popular items of the window written to Redis: what serving answers when no model can.")
def popular_fallback(context: dg.AssetExecutionContext, training_interactions: pd.DataFrame,
                     redis_state: RedisResource) -> dg.MaterializeResult:
    items = training.popular_items(training_interactions, k=get_settings().fallback_k)
    redis_state.state().set_popular_fallback(items)
    return dg.MaterializeResult(metadata={"items": len(items), "top_5": str([i for i, _ in items[:5]])})


@dg.asset(group_name="serving", deps=[trained_model], owners=OWNERS, kinds={"redis", "mlflow"},
          automation_condition=dg.AutomationCondition.eager(),
          freshness_policy=dg.FreshnessPolicy.time_window(
              fail_window=timedelta(hours=get_settings().model_max_age_h),
              warn_window=timedelta(hours=get_settings().model_max_age_h * 0.75)),
          description="The models serving answers with (the `champion`, and the `challenger` when there is one): "
                      "their top-N for the most active users precomputed in the Redis cache. Stale when no model "
                      "was trained for longer than the freshness window.")
def served_model(context: dg.AssetExecutionContext, training_interactions: pd.DataFrame,
                 mlflow_registry: MLflowResource, redis_state: RedisResource) -> dg.MaterializeResult:
    s = get_settings()
    registry = mlflow_registry.registry()
    state = redis_state.state()
    users = training.active_users(training_interactions, s.warm_cache_users)
    meta: dict = {"active_users": len(users)}
    for alias in (ALIAS_CHAMPION, ALIAS_CHALLENGER):
        loaded = registry.load(alias)
        meta[f"{alias}_version"] = loaded.version if loaded else "none"
        warmed = training.warm_cache(state, loaded, users, s.warm_cache_k, alias, s) if loaded else 0
        meta[f"{alias}_users_warmed"] = warmed
    context.log.info(f"cache warmed: {meta}")
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name="serving", owners=OWNERS, kinds={"redis"},
          description="Trending items: the hourly item counts of the last two days merged with decay into "
                      "Redis (the incremental hourly refresh; the stream consumer writes the counts).")
def trending(context: dg.AssetExecutionContext, redis_state: RedisResource) -> dg.MaterializeResult:
    state = redis_state.state()
    state.refresh_trending()
    top = state.trending(10)
    return dg.MaterializeResult(metadata={"top_10": str([i for i, _ in top]), "items": len(top)})
