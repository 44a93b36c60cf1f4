"""PRISM loader, pairs, LoRe split and `lore-fed prepare` on the hand-designed fixture (tests/fixtures/prism).

Fixture design (see tests/fixtures/prism/make_fixture.py): 7 survey rows (user2 survey-only), 13 conversations,
26 turns, 70 responses. Drops: c9 turn 1 nobody chose; c1 and c8 identical A/B both chosen; "EMPTY STRING" in c1
(turn 0) and c11 (turn 1); c5 and c12 a text equal to the chosen one (in c12 also at the same score); ties in c0
(top score), c1 (A/B) and c8 (turn 0); c10 the unchosen B scored higher. user4 has 2 conversations, only c7 with
pairs.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from lore_core.prism_hub import PrismSourceError, resolve_source
from lore_core.prism_pairs import PrismPrepareError, SplitConfig, build_pairs, prepare_dataset, split_users
from lore_core.prism_schema import PrismSchemaError, load_release
from lore_cli.main import main

FIXTURE = Path(__file__).parent / "fixtures" / "prism"
EXPECTED_DROPS = {
    "turns_without_chosen": 1,
    "turns_both_chosen": 2,
    "pairs_empty_string": 2,
    "pairs_identical_text": 2,
    "pairs_tied_score": 3,
    "pairs_rejected_scored_higher": 1,
}


@pytest.fixture(scope="module")
def release():
    return load_release(FIXTURE)


@pytest.fixture(scope="module")
def built(release):
    return build_pairs(release.conversations)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    summary = prepare_dataset(FIXTURE, out, min_conversations=2)
    return summary, out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def copy_fixture(tmp_path: Path) -> Path:
    source = tmp_path / "prism"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("*.py"))
    return source


# --- loader ---------------------------------------------------------------------------------------------------------
def test_fixture_loads_with_every_record_and_tolerated_oddity(release):
    assert len(release.survey) == 7 and release.survey["user2"]["survey_only"]
    assert release.survey["user2"]["lm_usecases"]["research"] is None
    assert len(release.conversations) == 13
    assert sum(len(c.turns) for c in release.conversations) == 26
    assert sum(len(t.responses) for c in release.conversations for t in c.turns) == 70
    assert release.utterances_checked
    assert release.warnings == {"turn0_top_score_ties": 3}
    by_id = {c.conversation_id: c for c in release.conversations}
    assert [r.within_turn_id for r in by_id["c3"].turns[0].responses] == [0, 1]  # stored as "0", "1"
    assert len(by_id["c6"].turns) == 1 and len(by_id["c1"].turns[0].responses) == 3
    assert by_id["c2"].turns[0].prompt.startswith("¿Qué puedo cocinar")


def test_utterances_file_is_optional(tmp_path):
    source = copy_fixture(tmp_path)
    (source / "utterances.jsonl").unlink()
    assert not load_release(source).utterances_checked


# --- pairs ----------------------------------------------------------------------------------------------------------
def test_drop_reasons_are_counted_exactly_as_designed(built):
    pairs, drops = built
    assert drops == EXPECTED_DROPS
    assert len(pairs) == 33


def test_pairs_are_strict_preferences_between_different_real_texts(built):
    pairs, _ = built
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert not any("EMPTY STRING" in (p["chosen"], p["rejected"]) for p in pairs)
    per_turn = {}
    for p in pairs:
        per_turn.setdefault((p["conversation"], p["turn"]), []).append(p["rejected"])
    assert len(per_turn[("c2", 0)]) == 3  # chosen vs each of the 3 lower-scored responses
    assert len(per_turn[("c6", 0)]) == 3  # the 1-turn conversation
    assert ("c8", 0) not in per_turn and ("c9", 1) not in per_turn


def test_history_is_the_conversation_up_to_the_turn(built):
    pairs, _ = built
    history = next(p["history"] for p in pairs if (p["conversation"], p["turn"]) == ("c3", 1))
    assert history == [
        {"role": "user", "content": "Should cities ban cars from their centres?"},
        {
            "role": "assistant",
            "content": "There are trade-offs: cleaner air and safer streets versus access for disabled people and "
            "deliveries.",
        },
        {"role": "user", "content": "What did Oslo do?"},
    ]
    for p in pairs:
        roles = [m["role"] for m in p["history"]]
        assert roles == ["user", "assistant"] * p["turn"] + ["user"]


# --- split ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "min_conversations, kept",
    [
        (2, {"user1": True, "user5": True, "user0": True, "user3": False, "user6": False}),
        (3, {"user3": False}),  # users dropped before user3 must not consume random numbers
    ],
)
def test_split_follows_the_lore_protocol(release, built, min_conversations, kept):
    pairs, _ = built
    with_pairs: dict[str, set] = {}
    for p in pairs:
        with_pairs.setdefault(p["user"], set()).add(p["conversation"])
    users = sorted({c.user_id for c in release.conversations})
    split = split_users(users, {u: sorted(c) for u, c in with_pairs.items()}, SplitConfig(min_conversations))

    # Re-derive by hand: permute the sorted users, 80% seen, then one permutation per kept user in that order.
    rng = np.random.RandomState(123)
    order = [users[i] for i in rng.permutation(len(users))]
    assert order == ["user1", "user4", "user5", "user0", "user3", "user6"]
    assert split.seen == kept
    assert split.dropped_users == tuple(sorted(set(users) - set(kept)))  # user4: 2 conversations, 1 with pairs
    expected = {}
    for user in kept:
        ids = sorted(with_pairs[user])
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        expected.update({cid: "train" if k < len(ids) // 2 else "test" for k, cid in enumerate(shuffled)})
    assert split.conversation_split == expected


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    outputs = {}
    for name, seed in [("a", 123), ("b", 123), ("c", 4)]:
        prepare_dataset(FIXTURE, tmp_path / name, min_conversations=2, split_seed=seed)
        outputs[name] = (tmp_path / name / "pairs.jsonl").read_bytes()
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]


def test_min_conversations_counts_conversations_that_still_have_pairs(tmp_path):
    summary = prepare_dataset(FIXTURE, tmp_path / "three", min_conversations=3)
    assert summary["users_kept"] == 1 and summary["users_dropped_min_conversations"] == 5
    assert {u["user"] for u in read_jsonl(tmp_path / "three" / "users.jsonl")} == {"user3"}
    with pytest.raises(PrismPrepareError, match="no user has at least 6 conversations with pairs"):
        prepare_dataset(FIXTURE, tmp_path / "default")
    assert not (tmp_path / "default").exists()


# --- prepare outputs ------------------------------------------------------------------------------------------------
def test_prepare_writes_pairs_users_and_summary(prepared):
    summary, out = prepared
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl", "summary.json", "users.jsonl"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["dropped"] == EXPECTED_DROPS
    figures = ("users_read", "survey_only_users", "users_dropped_min_conversations", "seen_users", "unseen_users")
    assert [summary[key] for key in figures] == [7, 1, 1, 3, 2]
    figures = ("conversations", "turns", "responses", "pairs_built", "pairs_kept")
    assert [summary[key] for key in figures] == [13, 26, 70, 33, 30]
    assert sum(summary["pairs_per_split"].values()) == 30 and min(summary["pairs_per_split"].values()) > 0

    pairs = read_jsonl(out / "pairs.jsonl")
    assert len(pairs) == 30
    assert set(pairs[0]) == {
        "user", "conversation", "turn", "history", "chosen", "rejected", "split", "seen", "chosen_score",
        "rejected_score",
    }  # fmt: skip
    split_of = {}
    for p in pairs:  # a conversation is wholly train or wholly test
        assert split_of.setdefault(p["conversation"], p["split"]) == p["split"]
    users = {u["user"]: u for u in read_jsonl(out / "users.jsonl")}
    assert sorted(users) == ["user0", "user1", "user3", "user5", "user6"]
    for user, row in users.items():
        mine = [p for p in pairs if p["user"] == user]
        assert all(p["seen"] == row["seen"] for p in mine)
        assert row["n_train_pairs"] == sum(p["split"] == "train" for p in mine) > 0  # few-shot pairs for unseen
        assert row["n_test_pairs"] == sum(p["split"] == "test" for p in mine) > 0
        train_conversations = {p["conversation"] for p in mine if p["split"] == "train"}
        assert len(train_conversations) == row["n_conversations"] // 2


def test_demographics_are_kept_for_privacy_audits(prepared):
    _, out = prepared
    user3 = next(u for u in read_jsonl(out / "users.jsonl") if u["user"] == "user3")
    demographics = user3["demographics"]
    assert demographics["age"] == "18-24 years old" and demographics["study_locale"] == "germany"
    assert demographics["religion"] == "Christian" and demographics["ethnicity"] == "White"
    assert demographics["location"]["reside_country"] == "Germany"
    assert demographics["location"]["birth_country"] == "Poland"
    assert set(demographics) == {
        "age", "gender", "education", "employment_status", "marital_status", "english_proficiency", "location",
        "religion", "ethnicity", "study_locale",
    }  # fmt: skip


def test_ground_truth_is_copied_unchanged_and_a_rerun_drops_a_stale_one(tmp_path):
    source = copy_fixture(tmp_path)
    np.savez(source / "ground_truth.npz", basis=np.arange(6.0).reshape(2, 3))
    out = tmp_path / "out"
    assert prepare_dataset(source, out, min_conversations=2)["ground_truth_copied"]
    assert (out / "ground_truth.npz").read_bytes() == (source / "ground_truth.npz").read_bytes()

    summary = prepare_dataset(FIXTURE, out, min_conversations=3)  # rerun into the existing dataset
    assert not summary["ground_truth_copied"] and not (out / "ground_truth.npz").exists()
    assert json.loads((out / "summary.json").read_text())["users_kept"] == 1


def test_prepare_accepts_a_generated_benchmark_population(tmp_path):
    """`lore-fed synth` output goes through prepare unchanged (a hashed bag-of-words embedder keeps this fast)."""
    from simulations.prism_population import BenchmarkConfig, conversation_distribution, generate_benchmark

    class HashedWordsEmbedder:
        name, dim = "hashed-words-16", 16

        def embed(self, contexts, responses):
            out = np.zeros((len(responses), self.dim), np.float32)
            for row, text in enumerate(responses):
                for word in text.split():
                    out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
            return out

    config = BenchmarkConfig(users=12, max_turns=3, conversations=conversation_distribution("3-6"), seed=1,
                             principal_directions=8)  # fmt: skip
    benchmark = generate_benchmark(config, HashedWordsEmbedder())
    benchmark.write(tmp_path / "prism")
    summary = prepare_dataset(tmp_path / "prism", tmp_path / "dataset", min_conversations=3)
    assert summary["users_read"] == 12 and summary["conversations"] == benchmark.stats["conversations"]
    assert summary["utterances_checked"] and summary["ground_truth_copied"]
    assert summary["seen_users"] > 0 and summary["unseen_users"] > 0 and summary["pairs_kept"] > 0


# --- bad input ------------------------------------------------------------------------------------------------------
def _edit_record(file: str, line: int, edit):
    def apply(source: Path) -> None:
        lines = (source / file).read_text().splitlines()
        record = json.loads(lines[line - 1])
        edit(record)
        lines[line - 1] = json.dumps(record)
        (source / file).write_text("\n".join(lines) + "\n")

    return apply


def _set_first_score(value):
    def edit(record):
        next(m for m in record["conversation_history"] if m["role"] == "model")["score"] = value

    return edit


def _break_json(source: Path) -> None:
    lines = (source / "conversations.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-40]
    (source / "conversations.jsonl").write_text("\n".join(lines) + "\n")


BAD_FILES = {
    "bad json": (_break_json, "conversations.jsonl line 4: not valid JSON"),
    "missing key": (
        _edit_record("survey.jsonl", 3, lambda r: r.pop("age")),
        "survey.jsonl line 3: survey row: missing key(s) ['age']",
    ),
    "wrong type": (
        _edit_record("conversations.jsonl", 2, _set_first_score("85")),
        "conversations.jsonl line 2: conversation_history[1]: 'score' must be an integer, got str",
    ),
    "score out of range": (
        _edit_record("conversations.jsonl", 5, _set_first_score(101)),
        "conversations.jsonl line 5: conversation_history[1]: 'score' must be in 1..100, got 101",
    ),
    "turn count": (
        _edit_record("conversations.jsonl", 1, lambda r: r.update(conversation_turns=3)),
        "conversations.jsonl line 1: conversation_turns is 3",
    ),
    "unknown user": (
        _edit_record("conversations.jsonl", 6, lambda r: r.update(user_id="user99")),
        "conversations.jsonl line 6: user_id 'user99' of c5 is not in",
    ),
    "five openers": (
        _edit_record("conversations.jsonl", 1, lambda r: r["conversation_history"].insert(
            5, {**r["conversation_history"][4], "within_turn_id": 4})),
        "conversations.jsonl line 1: turn 0 has 5 responses; expected 2-4",
    ),
    "later turn by another model": (
        _edit_record("conversations.jsonl", 1, lambda r: r["conversation_history"][6].update(model_name="claude-2.1")),
        "conversations.jsonl line 1: turn 1 answered by ['claude-2.1']",
    ),
    "different texts both chosen": (
        _edit_record("conversations.jsonl", 1, lambda r: r["conversation_history"][7].update(if_chosen=True)),
        "conversations.jsonl line 1: turn 1: several chosen responses with different texts",
    ),
    "utterances disagree": (
        _edit_record("utterances.jsonl", 10, lambda r: r.update(score=r["score"] % 100 + 1)),
        "utterances.jsonl line 10: 'score' is int",
    ),
    "lone surrogate": (  # found by a tester: prepare wrote it into pairs.jsonl and embed then failed naming no file
        _edit_record("conversations.jsonl", 2, lambda r: r.update(open_feedback="caf\udce9")),
        "conversations.jsonl line 2: \\udce9 is half of a UTF-16 surrogate pair",
    ),
    "NUL in a user id": (  # found by a tester: prepare wrote it and embed then refused the dataset it made
        _edit_record("survey.jsonl", 2, lambda r: r.update(user_id=r["user_id"] + "\x00")),
        "survey.jsonl line 2: survey row: 'user_id' must be a non-empty string without control or "
        "bidirectional-control characters",
    ),
    "right-to-left override in a user id": (  # a tester: printed raw, it reversed the rest of a message
        _edit_record("survey.jsonl", 2, lambda r: r.update(user_id="\u202e" + r["user_id"])),
        "survey.jsonl line 2: survey row: 'user_id' must be a non-empty string without control or "
        "bidirectional-control characters",
    ),
    "empty conversation id": (
        _edit_record("conversations.jsonl", 3, lambda r: r.update(conversation_id="")),
        "conversations.jsonl line 3: conversation: 'conversation_id' must be a non-empty string without control "
        "or bidirectional-control characters",
    ),
}


def test_user_ids_in_two_unicode_forms_are_refused_before_anything_is_written(tmp_path):
    """A tester: 'José' composed and decomposed print alike and were two users; `prepare` names them, writes nothing."""
    source = copy_fixture(tmp_path)
    rename = {"user0": "Jos\u00e9", "user1": "Jose\u0301"}
    for name in ("survey.jsonl", "conversations.jsonl", "utterances.jsonl"):
        records = [json.loads(line) for line in (source / name).read_text().splitlines() if line.strip()]
        for record in records:
            record["user_id"] = rename.get(record.get("user_id"), record.get("user_id"))
        (source / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    with pytest.raises(PrismPrepareError, match="user_id values are the same text in different Unicode forms") as info:
        prepare_dataset(source, out, min_conversations=2)
    assert "'Jos\\xe9'" in str(info.value) and not out.exists()

    # one name, composed in the survey and decomposed in the conversations: named as such, escaped
    records = [json.loads(line) for line in (source / "survey.jsonl").read_text().splitlines() if line.strip()]
    records = [record for record in records if record["user_id"] != "Jose\u0301"]  # the survey holds it composed
    (source / "survey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(PrismSchemaError, match="the same text in another Unicode form") as info:
        prepare_dataset(source, out, min_conversations=2)
    assert "user_id 'Jose\\u0301' of" in str(info.value) and "holds 'Jos\\xe9'" in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_name_file_and_line_and_write_nothing(tmp_path, case):
    mutate, message = BAD_FILES[case]
    source = copy_fixture(tmp_path)
    mutate(source)
    out = tmp_path / "out" / "dataset"
    with pytest.raises(PrismSchemaError) as info:
        prepare_dataset(source, out, min_conversations=2)
    assert message in str(info.value)
    assert not out.parent.exists()


@pytest.mark.parametrize("name", ["survey.jsonl", "utterances.jsonl"])
def test_a_release_file_that_is_a_directory_is_named_as_one(tmp_path, name):
    """Found by testers: a survey.jsonl that is a directory was reported as a missing file, and an utterances.jsonl
    (optional) that is a directory was skipped without a word."""
    source = copy_fixture(tmp_path)
    (source / name).unlink(missing_ok=True)
    (source / name).mkdir()
    with pytest.raises(PrismSchemaError, match=f"{name} is a directory, not a file"):
        load_release(source)


def test_failure_leaves_an_existing_dataset_as_it_was(tmp_path, prepared):
    _, good = prepared
    out = tmp_path / "dataset"
    shutil.copytree(good, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source = copy_fixture(tmp_path)
    _break_json(source)
    with pytest.raises(PrismSchemaError):
        prepare_dataset(source, out, min_conversations=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "prism"]  # no staging leftovers


@pytest.mark.parametrize("own", ["summary.json", "users.jsonl", "pairs.jsonl", "ground_truth.npz"])
def test_an_out_holding_the_users_own_files_is_refused_and_kept(tmp_path, capsys, own):
    """Found by a tester: prepare replaced a summary.json, users.jsonl or pairs.jsonl of the user's in --out and
    deleted their ground_truth.npz. A dataset of prepare's own (its summary.json) is still rewritten."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / own).write_text("the user's own file\n")
    assert main(["prepare", str(FIXTURE), "--out", str(out), "--min-conversations", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not a dataset of lore-fed prepare" in err and own in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == [own] and (out / own).read_text() == "the user's own file\n"

    dataset = tmp_path / "dataset"
    prepare_dataset(FIXTURE, dataset, min_conversations=2)
    (dataset / "users.jsonl").write_text("edited\n")
    assert main(["prepare", str(FIXTURE), "--out", str(dataset), "--min-conversations", "2"]) == 0
    assert (dataset / "users.jsonl").read_text() != "edited\n"


def test_a_write_into_an_existing_directory_cut_short_before_its_summary_runs_again(tmp_path, monkeypatch):
    """The files of the same dataset, left by a write cut short before its summary.json, are no user's own files."""
    import lore_core.prism_pairs as prism_pairs

    out = tmp_path / "dataset"
    out.mkdir()  # made by the user beforehand: written file by file, summary.json last
    write = prism_pairs.atomic_write_bytes

    def cut_short(path, data):
        if Path(path).name == "users.jsonl":
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(prism_pairs, "atomic_write_bytes", cut_short)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(FIXTURE, out, min_conversations=2)
    monkeypatch.setattr(prism_pairs, "atomic_write_bytes", write)
    assert sorted(p.name for p in out.iterdir()) == ["pairs.jsonl"]
    assert prepare_dataset(FIXTURE, out, min_conversations=2)["users_kept"] == 5
    with pytest.raises(PrismPrepareError, match="not a dataset of lore-fed prepare"):  # another dataset's: refused
        (out / "summary.json").unlink()
        prepare_dataset(FIXTURE, out, min_conversations=3)


def test_an_out_below_a_file_is_refused_naming_it(tmp_path, capsys):
    """Found by a tester: prepare did all its work, then failed with a bare '[Errno 17] File exists'."""
    (tmp_path / "afile").write_text("x")
    assert main(["prepare", str(FIXTURE), "--out", str(tmp_path / "afile" / "sub"), "--min-conversations", "2"]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err


# --- source resolution ----------------------------------------------------------------------------------------------
def test_local_directory_is_used_as_is():
    assert resolve_source(FIXTURE) == FIXTURE


def test_hub_name_offline_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrismSourceError, match="pass their local directory"):
        resolve_source("HannahRoseKirk/prism-alignment")
    with pytest.raises(PrismSourceError, match="not a directory and not a hub dataset name"):
        resolve_source("no/such/prism/dir")


# --- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_prepare(tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(["prepare", str(FIXTURE), "--out", str(out), "--min-conversations", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 seen, 2 unseen" in printed and "pairs: 30 kept" in printed and str(out) in printed
    assert (out / "pairs.jsonl").exists()

    assert main(["prepare", str(FIXTURE), "--out", str(tmp_path / "none")]) == 2
    assert "lower --min-conversations" in capsys.readouterr().err


def test_a_new_split_removes_the_embedding_of_the_old_pairs(tmp_path):
    """Found by a hostile-input test: prepare over an embedded dataset rewrote pairs.jsonl and kept pairs.npz, so
    train read the old split without a word. The same pairs keep their embedding."""
    out = tmp_path / "dataset"
    prepare_dataset(FIXTURE, out, min_conversations=2, split_seed=1)
    (out / "pairs.npz").write_bytes(b"stand-in for the embedded pairs")
    prepare_dataset(FIXTURE, out, min_conversations=2, split_seed=1)
    assert (out / "pairs.npz").exists()  # nothing changed: re-embedding would be wasted
    with pytest.warns(UserWarning, match="lore-fed embed"):
        prepare_dataset(FIXTURE, out, min_conversations=2, split_seed=7)
    assert not (out / "pairs.npz").exists()
    other = tmp_path / "other"  # a pairs.npz that no pairs.jsonl here produced is not this command's to remove
    other.mkdir()
    (other / "pairs.npz").write_bytes(b"someone else's file")
    prepare_dataset(FIXTURE, other, min_conversations=2, split_seed=7)
    assert (other / "pairs.npz").read_bytes() == b"someone else's file"


def test_prepare_warns_when_no_pair_is_a_test_pair(tmp_path):
    """A tester's `prepare --train-fraction 1` gave no word that every later figure would be a training figure."""
    summary = prepare_dataset(FIXTURE, tmp_path / "all_train", min_conversations=2, train_fraction=1.0)
    assert any("no pair is a test pair (train fraction 1.0)" in w for w in summary["population_warnings"])
    assert not any("test pair" in w for w in prepare_dataset(FIXTURE, tmp_path / "half", min_conversations=2)[
        "population_warnings"])
