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


def test_rollback_goes_back_to_the_version_the_champion_replaced_after_promotions_by_hand(settings,
                                                                                        registered_champion):
    """`champion_before` is written when a version is trained: after `promote 3, promote 2` the rollback went to
    version 2's training-time champion (v1) instead of v3, the version v2 had replaced."""
    registry, reg = registered_champion
    first = reg.version
    model = registry.load().recommender
    second, third = (registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1},
                                               tags={"champion_before": first})[1] for _ in range(2))
    registry.promote(third)
    registry.promote(second)
    assert registry.rollback()["after"]["champion"] == third
    assert registry.rollback()["after"]["champion"] == first  # and once more, one further back

    # a person moves `champion` in the MLflow UI: rollback returns to the champion that move replaced
    registry.promote(third)
    registry.client.set_registered_model_alias(registry.name, ALIAS_CHAMPION, second)
    assert registry.rollback()["after"]["champion"] == third
    # the next change through shoprec records the hand-made one too
    registry.client.set_registered_model_alias(registry.name, ALIAS_CHAMPION, second)
    registry.promote(first)
    assert registry.rollback()["after"]["champion"] == second


def test_promoting_another_version_takes_a_leftover_challenger_off_the_demoted_champion(settings,
                                                                                       registered_champion):
    """After `promote` the challenger alias stays on the new champion (not served); a later `promote VERSION`
    made the old champion a served challenger again, in half the traffic."""
    registry, reg = registered_champion
    model = registry.load().recommender
    second = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1}, tags={})[1]
    registry.set_alias(ALIAS_CHALLENGER, second)
    registry.promote()
    assert registry.aliases() == {ALIAS_CHAMPION: second, ALIAS_CHALLENGER: second}
    assert registry.promote(reg.version)["after"] == {ALIAS_CHAMPION: reg.version, ALIAS_CHALLENGER: None}
    registry.set_alias(ALIAS_CHALLENGER, second)  # a challenger of its own is left alone
    assert registry.promote(reg.version)["after"] == {ALIAS_CHAMPION: reg.version, ALIAS_CHALLENGER: second}


def test_serving_keeps_its_models_while_mlflow_cannot_be_reached(settings, registered_champion, monkeypatch):
    """An unreachable registry read as "no aliases": serving dropped the champion it was serving."""
    import pytest
    from mlflow.exceptions import MlflowException

    from pipelines import localstack
    from pipelines.registry import ModelRegistry
    from pipelines.serving import ModelHolder

    registry, reg = registered_champion
    holder = ModelHolder(settings, registry=registry)
    assert holder.refresh() == {ALIAS_CHAMPION: reg.version}
    assert registry.aliases() == {ALIAS_CHAMPION: reg.version, ALIAS_CHALLENGER: None}  # an unset alias is None

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    holder.registry = ModelRegistry(f"http://127.0.0.1:{localstack.free_port()}", name=registry.name)
    with pytest.raises(MlflowException):
        holder.registry.version_for(ALIAS_CHAMPION)  # not None: that means "no champion"
    assert holder.refresh() == {ALIAS_CHAMPION: reg.version}
    assert holder.models[ALIAS_CHAMPION].version == reg.version


def test_promoting_the_champion_says_it_already_is_and_changes_nothing(settings, registered_champion, monkeypatch):
    """It printed the same before/now line and "serving follows within ..." as if something had changed."""
    registry, reg = registered_champion
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", registry.name)
    from pipelines.settings import get_settings
    get_settings.cache_clear()
    history = registry.champion_history()
    out = CliRunner().invoke(app, ["model", "promote", reg.version])
    assert out.exit_code == 0, out.output
    assert out.output == f"v{reg.version} already is the champion: nothing changed\n"
    assert registry.aliases() == {ALIAS_CHAMPION: reg.version, ALIAS_CHALLENGER: None}
    assert registry.champion_history() == history
    # the default, the challenger, left on the champion after a promotion: the same
    registry.set_alias(ALIAS_CHALLENGER, reg.version)
    out = CliRunner().invoke(app, ["model", "promote"])
    assert out.exit_code == 0 and "already is the champion" in out.output


def test_versions_are_named_as_model_show_prints_them_and_a_challenger_is_set_by_hand(settings, registered_champion,
                                                                                     monkeypatch):
    """`model show` prints `champion: v1`, and `model promote v1` answered "has no version 'v1'"; `promote challenger`
    said the same; a challenger could be set only in the MLflow UI."""
    registry, reg = registered_champion
    first = reg.version
    model = registry.load().recommender
    second = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1}, tags={})[1]
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", registry.name)
    from pipelines.settings import get_settings
    get_settings.cache_clear()
    run = CliRunner().invoke

    out = run(app, ["model", "challenger", f"v{second}"])
    assert out.exit_code == 0, out.output
    assert registry.aliases() == {ALIAS_CHAMPION: first, ALIAS_CHALLENGER: second}
    out = run(app, ["model", "challenger", "champion"])  # the champion cannot challenge itself
    assert out.exit_code == 1 and "is the champion" in out.output
    out = run(app, ["model", "promote", "challenger"])
    assert out.exit_code == 0 and registry.aliases()[ALIAS_CHAMPION] == second, out.output
    out = run(app, ["model", "promote", f"V{first}"])
    assert out.exit_code == 0 and registry.aliases()[ALIAS_CHAMPION] == first, out.output
    out = run(app, ["model", "promote", "latest"])
    assert out.exit_code == 1 and "is not a version: name one as a number (3, or v3" in out.output
    out = run(app, ["model", "challenger", "--remove"])
    assert out.exit_code == 0 and registry.aliases()[ALIAS_CHALLENGER] is None, out.output
    out = run(app, ["model", "promote", "challenger"])
    assert out.exit_code == 1 and "has no challenger" in out.output
    assert registry.aliases() == {ALIAS_CHAMPION: first, ALIAS_CHALLENGER: None}  # the errors changed nothing
