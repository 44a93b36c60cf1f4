"""The benchmark generator (`lore-fed synth`) on a tiny population with the real offline MiniLM."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simulations.prism_population import (
    DEMOGRAPHICS,
    GROUND_TRUTH_FILE,
    PLANTED_BASES,
    BenchmarkConfig,
    BenchmarkConfigError,
    conversation_distribution,
    generate_benchmark,
    load_ground_truth,
)
from lore_core.prism_pairs import build_pairs
from lore_core.prism_schema import (
    CONVERSATION_SCHEMA,
    CONVERSATIONS_FILE,
    SURVEY_FILE,
    SURVEY_SCHEMA,
    UTTERANCE_SCHEMA,
    UTTERANCES_FILE,
    load_release,
)
from simulations.text_pool import CANDIDATES_PER_EXCHANGE, build_text_pool

TINY = BenchmarkConfig(users=12, conversations=conversation_distribution("2-4"), max_turns=3, seed=3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="module")
def embedder(cache_dir):
    from lore_core.embeddings import load_embedder

    return load_embedder(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def bench(embedder):
    return generate_benchmark(TINY, embedder)


@pytest.fixture(scope="module")
def written(bench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prism")
    bench.write(out)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_pass_the_strict_release_reader(written):
    release = load_release(written)  # key sets, value kinds, turn invariants, utterances == derivation
    assert release.utterances_checked
    assert len(release.survey) == TINY.users


def test_every_record_has_exactly_the_release_keys(written):
    survey = _jsonl(written / SURVEY_FILE)
    assert len(SURVEY_SCHEMA) == 32 and all(list(row) == list(SURVEY_SCHEMA) for row in survey)
    assert all(list(row) == list(CONVERSATION_SCHEMA) for row in _jsonl(written / CONVERSATIONS_FILE))
    assert all(list(row) == list(UTTERANCE_SCHEMA) for row in _jsonl(written / UTTERANCES_FILE))


def test_turns_follow_prism_rules(bench):
    for conversation in bench.conversations:
        models = [m for m in conversation["conversation_history"] if m["role"] == "model"]
        turn0 = [m for m in models if m["turn"] == 0]
        assert 2 <= len(turn0) <= 4
        assert len({m["model_name"] for m in turn0}) == len(turn0)
        chosen0 = [m for m in turn0 if m["if_chosen"]]
        assert len(chosen0) == 1 and chosen0[0]["score"] == max(m["score"] for m in turn0)
        for t in range(1, conversation["conversation_turns"]):
            ab = [m for m in models if m["turn"] == t]
            assert len(ab) == 2 and {m["model_name"] for m in ab} == {chosen0[0]["model_name"]}
            chosen = [m for m in ab if m["if_chosen"]]
            assert chosen and all(m["score"] == max(x["score"] for x in ab) for m in chosen)
            assert (len(chosen) == 2) == (ab[0]["content"] == ab[1]["content"])
        assert all(isinstance(m["score"], int) and 1 <= m["score"] <= 100 for m in models)


def test_scores_follow_the_hidden_reward(bench):
    """Within a turn, the higher true reward is scored higher far more often than not (noise is moderate)."""
    rows = bench.utterances
    higher, agree = 0, 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if rows[i]["interaction_id"] != rows[j]["interaction_id"] or rows[i]["score"] == rows[j]["score"]:
                continue
            higher += 1
            agree += (rows[i]["score"] > rows[j]["score"]) == (bench.true_rewards[i] > bench.true_rewards[j])
    assert higher > 100 and agree / higher > 0.7


def test_true_logits_of_prepared_pairs_match_the_generator(bench, written, embedder):
    """The history `prepare` builds gives exactly the embeddings the generator scored (same cache keys)."""
    pairs, _ = build_pairs(load_release(written).conversations)
    index = {(u["conversation_id"], u["turn"], u["model_response"]): k for k, u in enumerate(bench.utterances)}
    histories = [p["history"] for p in pairs]
    chosen = embedder.embed(histories, [p["chosen"] for p in pairs])
    rejected = embedder.embed(histories, [p["rejected"] for p in pairs])
    rows_c = [index[(p["conversation"], p["turn"], p["chosen"])] for p in pairs]
    rows_r = [index[(p["conversation"], p["turn"], p["rejected"])] for p in pairs]
    np.testing.assert_array_equal(chosen, bench.response_embeddings[rows_c])
    np.testing.assert_array_equal(rejected, bench.response_embeddings[rows_r])
    truth = bench.truth
    user = [int(p["user"].removeprefix("user")) for p in pairs]
    logit = truth.logit_scale * np.einsum("nk,nk->n", (chosen - rejected) @ truth.basis.T, truth.user_weights[user])
    expected = truth.logit_scale * (bench.true_rewards[rows_c] - bench.true_rewards[rows_r])
    np.testing.assert_allclose(logit, expected, atol=1e-4)


def test_ground_truth_file(bench, written, embedder):
    truth = load_ground_truth(written)
    assert truth.basis.shape == (TINY.rank, embedder.dim) and truth.basis.dtype == np.float32
    assert truth.center.shape == (embedder.dim,)
    assert truth.user_id.tolist() == [f"user{u}" for u in range(TINY.users)]
    assert truth.user_weights.shape == (TINY.users, TINY.rank)
    np.testing.assert_allclose(truth.user_weights.sum(axis=1), 1.0)
    assert truth.logit_scale == pytest.approx(1.702 / (np.sqrt(2) * TINY.noise))
    assert truth.embedder == embedder.name
    assert truth.config == TINY
    with np.load(written / GROUND_TRUTH_FILE) as data:
        assert {"basis", "user_id", "user_weights", "logit_scale", "embedder", "center"} <= set(data.files)


def test_a_synth_pair_file_names_the_embedder_it_was_embedded_with(written, embedder, cache_dir, tmp_path):
    """synth -> prepare -> embed: pairs.npz carries the embedder's id (the one the truth was made with, so the oracle
    is kept), which `train` and `simulate` copy into basis.npz."""
    from lore_cli.main import main
    from lore_core.pairs import load_pairs

    dataset = tmp_path / "dataset"
    assert main(["prepare", str(written), "--out", str(dataset), "--min-conversations", "2"]) == 0
    assert main(["embed", str(dataset), "--cache-dir", str(cache_dir)]) == 0
    pairs = load_pairs(dataset)
    assert pairs.embedder == embedder.name == load_ground_truth(written).embedder
    assert pairs.logit_true is not None


def test_truth_stays_out_of_the_jsonl(bench, written):
    text = "".join((written / name).read_text() for name in (SURVEY_FILE, CONVERSATIONS_FILE, UTTERANCES_FILE))
    for word in ("basis", "user_weights", "logit", "reward", "ground_truth"):
        assert word not in text
    weight = f"{bench.truth.user_weights[0, 0]:.6f}"
    assert weight not in text


def test_same_seed_same_population_other_seed_differs(bench, embedder):
    again = generate_benchmark(TINY, embedder)
    assert again.conversations == bench.conversations and again.survey == bench.survey
    np.testing.assert_array_equal(again.truth.basis, bench.truth.basis)
    np.testing.assert_array_equal(again.truth.user_weights, bench.truth.user_weights)
    other = generate_benchmark(replace(TINY, users=3, seed=4), embedder)
    assert other.survey[0]["study_id"] != bench.survey[0]["study_id"]
    assert not np.allclose(other.truth.user_weights, bench.truth.user_weights[:3])


def test_planted_attribute_shifts_user_weights(embedder):
    # Few conversations: the weights are drawn before any text, so 400 users cost little embedding.
    base = replace(TINY, users=400, conversations=(0.95, 0.05), max_turns=1)
    planted = generate_benchmark(replace(base, plant_attribute="gender", plant_strength=1.0), embedder)
    group = planted.truth.planted_group
    female = np.array([row["gender"] == DEMOGRAPHICS["gender"][0][0] for row in planted.survey])
    np.testing.assert_array_equal(group, female)
    lean = planted.truth.user_weights[:, list(PLANTED_BASES)].sum(axis=1)
    assert lean[group].mean() - lean[~group].mean() > 0.2

    plain = generate_benchmark(base, embedder)
    assert not plain.truth.planted_group.any()
    lean = plain.truth.user_weights[:, list(PLANTED_BASES)].sum(axis=1)
    assert abs(lean[female].mean() - lean[~female].mean()) < 0.12


def test_text_pool_is_deterministic_with_distinct_candidates():
    pool = build_text_pool(0)
    assert pool == build_text_pool(0) and pool != build_text_pool(1)
    assert len(pool.openers) > 200
    for exchange in pool.openers + tuple(x for v in pool.follow_ups.values() for x in v):
        assert len(set(exchange.candidates)) == CANDIDATES_PER_EXCHANGE


@pytest.mark.parametrize(
    "knobs",
    [{"noise": 0.0}, {"rank": 0}, {"heterogeneity": -1.0}, {"plant_attribute": "shoe_size"},
     {"plant_attribute": "age", "rank": 2}, {"conversations": (1.0, 0.0)},
     # found by a tester: inf wrote NaN true weights with exit 0; a seed outside numpy's range failed after the work
     {"heterogeneity": float("inf")}, {"plant_strength": float("inf")}, {"seed": -1}, {"seed": 2**64}],
)  # fmt: skip
def test_bad_knobs_are_refused(knobs):
    with pytest.raises(BenchmarkConfigError):
        replace(TINY, **knobs)


def test_cli_writes_a_population(tmp_path, cache_dir, capsys):
    from lore_cli.main import main

    out = tmp_path / "prism"
    argv = ["synth", "--users", "6", "--out", str(out), "--conversations", "2", "--max-turns", "2", "--seed", "1",
            "--plant-attribute", "age", "--cache-dir", str(cache_dir)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "12 conversations" in printed and str(out / GROUND_TRUTH_FILE) in printed
    release = load_release(out)
    assert len(release.conversations) == 12
    assert load_ground_truth(out).config.plant_attribute == "age"
    assert main(["synth", "--users", "6", "--out", str(out), "--conversations", "two"]) == 2


def test_a_population_whose_write_was_cut_short_is_written_again(tmp_path, cache_dir, monkeypatch):
    """synth refuses an --out with PRISM files and no ground_truth.npz (a release of the user's, found replaced by a
    tester); so the truth is written first, and a write cut short after it leaves a directory the rerun takes."""
    import simulations.prism_population as population
    from lore_cli.main import main

    out = tmp_path / "prism"
    argv = ["synth", "--users", "6", "--out", str(out), "--conversations", "2", "--max-turns", "2", "--seed", "1",
            "--cache-dir", str(cache_dir)]  # fmt: skip
    assert main(argv) == 0
    write_text = population.atomic_write_text

    def cut_short(path, text):
        if Path(path).name != "survey.jsonl":
            raise KeyboardInterrupt  # Ctrl-C after the survey was written
        write_text(path, text)

    monkeypatch.setattr(population, "atomic_write_text", cut_short)
    assert main([*argv[:-2], "--seed", "2", "--cache-dir", str(cache_dir)]) == 130
    monkeypatch.setattr(population, "atomic_write_text", write_text)
    assert load_ground_truth(out).config.seed == 2  # the new population's truth is there before its files
    assert main([*argv[:-2], "--seed", "2", "--cache-dir", str(cache_dir)]) == 0
    assert len(load_release(out).survey) == 6 and load_ground_truth(out).config.seed == 2
