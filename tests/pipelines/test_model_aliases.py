"""`shoprec model promote | rollback | show` against a real MLflow registry (SQLite)."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION


def test_promote_then_rollback_takes_the_rolled_back_version_out_of_traffic(settings, registered_champion,
                                                                             monkeypatch):
    registry, reg = registered_champion
    first = reg.version
    model = registry.load().recommender
    _, second = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1},
                                          tags={"champion_before": first})
    registry.set_alias(ALIAS_CHALLENGER, second)
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", registry.name)
    from pipelines.settings import get_settings
    get_settings.cache_clear()
    run = CliRunner().invoke

    out = run(app, ["model", "promote"])
    assert out.exit_code == 0, out.output
    assert f"champion v{second}" in out.output.splitlines()[1]
    assert registry.aliases() == {ALIAS_CHAMPION: second, ALIAS_CHALLENGER: second}  # that challenger is not served

    out = run(app, ["model", "rollback"])
    assert out.exit_code == 0, out.output
    # the README's old rollback left `challenger` on the bad version: half the traffic went back to it
    assert registry.aliases() == {ALIAS_CHAMPION: first, ALIAS_CHALLENGER: None}
    assert run(app, ["model", "show"]).output == f"champion: v{first}\nchallenger: -\n"

    # errors say what to do, and change nothing
    out = run(app, ["model", "rollback"])
    assert out.exit_code == 1 and "names no earlier champion" in out.output and "promote" in out.output
    out = run(app, ["model", "promote"])
    assert out.exit_code == 1 and "no challenger to promote" in out.output
    out = run(app, ["model", "promote", "999"])
    assert out.exit_code == 1 and "has no version '999'" in out.output
    assert registry.aliases() == {ALIAS_CHAMPION: first, ALIAS_CHALLENGER: None}
    out = run(app, ["model", "promote", second])
    assert out.exit_code == 0 and registry.aliases()[ALIAS_CHAMPION] == second
