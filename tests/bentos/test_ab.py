"""A/B: the split matches the configured shares, is sticky, and every answer's impression carries its variant."""

from __future__ import annotations

import pytest

from pipelines import kafka_io
from pipelines.experiment import Experiment
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION
from tests.bentos.test_service import client_for  # noqa: F401  (fixture)
from tests.topics import impressions_in


@pytest.mark.parametrize("shares", [{"champion": 0.5, "challenger": 0.5}, {"champion": 0.8, "challenger": 0.2}])
def test_10k_users_split_within_1pp_and_sticky(shares):
    exp = Experiment("ranking", "salt-1", shares)
    users = [f"user-{n}" for n in range(10_000)]
    got = [exp.assign(u) for u in users]
    for variant, share in shares.items():
        assert abs(got.count(variant) / len(users) - share) <= 0.01, variant
    assert [exp.assign(u) for u in users] == got  # sticky
    reshuffled = [Experiment("ranking", "salt-2", shares).assign(u) for u in users[:1000]]
    assert reshuffled != got[:1000]  # a new salt reshuffles users


def test_no_challenger_sends_everyone_to_the_champion():
    exp = Experiment("ranking", "s", {"champion": 0.5, "challenger": 0.5})
    assert {exp.assign(f"u{n}", available={ALIAS_CHAMPION}) for n in range(1000)} == {ALIAS_CHAMPION}


def test_experiment_from_yaml(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("name: ranking-nov\nsalt: nov-a\nvariants:\n  champion: 0.7\n  challenger: 0.3\n")
    exp = Experiment.from_yaml(f)
    assert (exp.name, exp.salt, exp.variants) == ("ranking-nov", "nov-a", {"champion": 0.7, "challenger": 0.3})
    f.write_text("variants:\n  champion: 0.7\n  challenger: 0.7\n")
    with pytest.raises(ValueError, match="sum to 1"):
        Experiment.from_yaml(f)


def test_both_variants_served_and_impressions_carry_variant_and_version(settings, redis_client,
                                                                        registered_champion, client_for):
    registry, reg = registered_champion
    model = registry.load(ALIAS_CHAMPION).recommender  # the same model again, registered as the challenger
    _, challenger_version = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1},
                                                      tags={})
    registry.set_alias(ALIAS_CHALLENGER, challenger_version)
    kafka_io.ensure_topics(settings)
    c = client_for(registry.name, ab_challenger_share=0.5)
    answers = [c.post("/recommend", json={"user_id": f"ab-{n}", "k": 3}).json() for n in range(40)]
    exp = Experiment.from_settings(settings.model_copy(update={"ab_challenger_share": 0.5}))
    for n, a in enumerate(answers):
        assert a["variant"] == exp.assign(f"ab-{n}")
        assert a["model_version"] == (reg.version if a["variant"] == ALIAS_CHAMPION else challenger_version)
    assert {a["variant"] for a in answers} == {ALIAS_CHAMPION, ALIAS_CHALLENGER}
    impressions = impressions_in(settings, {a["request_id"] for a in answers})
    assert len(impressions) == len(answers)
    pair = f"{exp.name}@champion.{reg.version}:challenger.{challenger_version}"  # the comparison both were in
    for a in answers:
        ev = impressions[a["request_id"]]
        assert (ev["variant"], ev["model_version"], ev["experiment"]) == (a["variant"], a["model_version"], pair)
        assert a["experiment"] == pair
        assert ev["items"] == [i["item_id"] for i in a["items"]]


def test_an_experiment_file_names_the_counters_the_dashboard_reads(settings, redis_client, tmp_path, monkeypatch):
    """With SHOPREC_AB_EXPERIMENT_FILE the consumer counts under the file's name, where the A/B page looks."""
    from pipelines import dashboard_data as dd
    from pipelines.cli import _consumer_setup
    from pipelines.schemas import new_event
    from pipelines.settings import get_settings
    from pipelines.state import OnlineState

    f = tmp_path / "exp.yaml"
    f.write_text("name: homepage-v2\nsalt: s1\nvariants: {champion: 0.5, challenger: 0.5}\n")
    monkeypatch.setenv("SHOPREC_AB_EXPERIMENT_FILE", str(f))
    get_settings.cache_clear()
    s, consumer_state = _consumer_setup(False)
    consumer_state.apply_events([
        new_event("impression", "u1", None, "s1", items=["i1"], request_id="r1", variant=ALIAS_CHALLENGER),
        new_event("click", "u1", "i1", "s1", request_id="r1")])
    page = OnlineState(redis_client, experiment=dd.ABConfig.from_settings(s).experiment)  # what the A/B page reads
    assert dd.fetch_snapshot(page).ab_counts == {ALIAS_CHALLENGER: {"impressions": 1, "clicks": 1}}


def test_the_tag_names_the_versions_served_and_bad_names_are_refused():
    exp = Experiment("ranking", "s", {"champion": 0.8, "challenger": 0.2})
    assert exp.tag({"champion": "3", "challenger": "5"}) == "ranking@champion.3:challenger.5"
    assert exp.tag({"challenger": "5", "champion": "3"}) == "ranking@champion.3:challenger.5"  # the experiment's order
    assert exp.tag({"champion": "3"}) == "ranking@champion.3"  # no challenger served: a comparison of its own
    assert exp.tag({}) == "ranking"  # nothing served (fallback only)
    with pytest.raises(ValueError, match="experiment name 'spring sale'"):
        Experiment("spring sale", "s")
    with pytest.raises(ValueError, match="not an MLflow alias"):
        Experiment("ranking", "s", {"champion": 0.5, "chal.lenger": 0.5})


def test_an_hourly_refresh_continues_the_comparison_of_the_versions_it_refreshed(settings, redis_client,
                                                                                registered_champion, client_for):
    from pipelines.schemas import TAG_TRAINED_VERSION

    registry, reg = registered_champion
    model = registry.load(ALIAS_CHAMPION).recommender
    _, trained = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1}, tags={})
    # what refresh_job registers: a new version whose tags name the trained version it came from
    _, refreshed = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1},
                                             tags={TAG_TRAINED_VERSION: trained, "refresh_of": trained})
    registry.set_alias(ALIAS_CHALLENGER, refreshed)
    kafka_io.ensure_topics(settings)
    c = client_for(registry.name, ab_challenger_share=0.5)
    answers = [c.post("/recommend", json={"user_id": f"ab-{n}", "k": 3}).json() for n in range(20)]
    served = {a["model_version"] for a in answers if a["variant"] == ALIAS_CHALLENGER}
    assert served == {refreshed}  # the refreshed version answers ...
    exp = Experiment.from_settings(settings.model_copy(update={"ab_challenger_share": 0.5}))
    # ... in the comparison of the trained versions, which it continues
    assert {a["experiment"] for a in answers} == {f"{exp.name}@champion.{reg.version}:challenger.{trained}"}
    assert c.post("/status", json={}).json()["comparison"] == f"{exp.name}@champion.{reg.version}:challenger.{trained}"
