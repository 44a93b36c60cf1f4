"""The on-device client (client.device): torch-free commands, solver parity with the torch trainer, ranking parity
with the full transformers pipeline, crash-safe and checked state, forgetting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.device import personalize, ranking
from client.device.encoder import OnnxPairEncoder
from client.device.state import (
    BasisMismatchError,
    StateCorruptError,
    StateError,
    check_compatible,
    load_state,
    new_state,
    save_state,
)
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.basis_file import BasisFileError, load_basis, save_basis
from lore_core.reward_math import mean_user_accuracy
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, few_shot_objective, prior_from_pairs

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "flwr", "lore_cli")  # lore_cli: not in the app bundle (fab-include)
# Runs a module as `python -m` would and reports, at exit, which heavy packages the process imported.
WRAPPER = (
    "import atexit, json, runpy, sys\n"
    f"atexit.register(lambda: print('HEAVY=' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), "
    "file=sys.stderr))\n"
    "module = sys.argv[1]; sys.argv = [module] + sys.argv[2:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def device(state: Path, *args: str, module: str = "client.device", check: bool = True):
    """Run a device command in a fresh process; returns (completed process, heavy modules it imported)."""
    cmd = [sys.executable, "-c", WRAPPER, module]
    cmd += (["device"] if module == "lore_cli.main" else []) + ["--state", str(state), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    heavy = [json.loads(line[6:]) for line in proc.stderr.splitlines() if line.startswith("HEAVY=")]
    assert heavy, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc, heavy[-1]


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """The full pipeline's embedder (transformers)."""
    from lore_core.embeddings import SentenceEmbedder

    return SentenceEmbedder(use_cache=False)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, reference):
    from client.device.export import export_encoder

    return export_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def exchanges():
    from simulations.text_pool import build_text_pool

    return build_text_pool(seed=3, openers_per_category=2, follow_ups_per_category=1).openers


@pytest.fixture()
def basis_file(tmp_path, reference):
    rng = np.random.default_rng(5)
    return save_basis(tmp_path / "basis.npz", rng.standard_normal((5, reference.dim)), version=7,
                      embedder=reference.name)


def _choices(exchanges, reference, basis, w_true) -> list[dict]:
    """The user's choices: the best vs the worst candidate under a hidden reward (basis, w_true)."""
    records = []
    for ex in exchanges:
        emb = reference.embed([[{"role": "user", "content": ex.prompt}]] * len(ex.candidates), list(ex.candidates),
                              progress=False)
        r = emb @ basis.T @ w_true
        records.append({"prompt": ex.prompt, "chosen": ex.candidates[r.argmax()],
                        "rejected": ex.candidates[r.argmin()]})
    return records


# --- 1. torch-free device path --------------------------------------------------------------------------------


def test_device_commands_never_import_torch_transformers_or_flwr(tmp_path, basis_file, encoder_dir, exchanges):
    state = tmp_path / "state"
    choices = tmp_path / "choices.jsonl"
    choices.write_text("\n".join(json.dumps({"prompt": ex.prompt, "chosen": ex.candidates[0],
                                             "rejected": ex.candidates[3]}) for ex in exchanges[:4]))
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(list(exchanges[5].candidates)))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({"prompt": ex.prompt, "responses": list(ex.candidates[1:3])})
                              for ex in exchanges[6:9]))
    basis = load_basis(basis_file)
    priors = tmp_path / "priors.json"
    priors.write_text(json.dumps({"format": "lore-fed-attribute-priors/1", "basis_sha256": basis.sha256,
                                  "rank": basis.rank, "groups": {"age": {"18-24": {"users": 25,
                                                                                    "mean": [0.2] * 5}}}}))
    runs = [
        ("init", "--basis", basis_file, "--encoder", encoder_dir),
        ("declare", "age=18-24", "--priors", priors),
        ("next-question", "--candidates", pool, "--k", "2"),
        ("adapt", "--choices", choices),
        ("rank", "--prompt", exchanges[5].prompt, "--candidates", candidates, "--strength", "0.5", "--json"),
        ("strength", "off"),
        ("status",),
        ("forget",),
    ]
    for args in runs:
        _, heavy = device(state, *args)
        assert heavy == [], f"`{args[0]}` imported {heavy}"
    proc, heavy = device(state, "rank", "--prompt", "hi", "--candidates", candidates, module="lore_cli.main")
    assert heavy == ["lore_cli"] and len(proc.stdout.splitlines()) == len(exchanges[5].candidates)  # its own CLI


def test_commands_that_embed_write_nothing_outside_the_state_directory(tmp_path, monkeypatch, encoder_dir):
    """Found by a tester: onnxruntime 1.32 kept telemetry for upload to Microsoft in
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime (a device id, the process path, the model file's name, how many
    texts each call embedded) every time a device command embedded text. Nothing is written outside the state now."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    embedder = json.loads((encoder_dir / "encoder.json").read_text())["embedder"]
    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 384)), version=1,
                       embedder=embedder)
    choices = tmp_path / "choices.jsonl"
    choices.write_text(json.dumps({"prompt": "How do I save money?", "chosen": "Budget.", "rejected": "Lottery."}))
    candidates = tmp_path / "answers.txt"
    candidates.write_text("Spend less than you earn.\nBuy a yacht.\n")
    state = tmp_path / "state"
    device(state, "init", "--basis", basis, "--encoder", encoder_dir)
    device(state, "adapt", "--choices", choices)
    device(state, "rank", "--prompt", "How do I save money?", "--candidates", candidates)
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


# --- 2. solver parity with the torch trainer ------------------------------------------------------------------


def test_few_shot_accuracy_matches_torch_trainer():
    from lore_core.joint_trainer import fit_few_shot_torch
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=64, seen_users=0, unseen_users=60, test_pairs=60))
    user_ids, user_idx = pairs.user_index()
    train = pairs.split == "train"
    device_w = np.stack([personalize.adapt(truth.basis, pairs.diff[train & (user_idx == u)]).user_weights
                         for u in range(user_ids.size)])
    lam = prior_from_pairs(user_idx[train], user_ids.size, DEFAULT_PRIOR_PAIRS)  # the device's default prior
    torch_w = fit_few_shot_torch(truth.basis, pairs.diff[train], user_idx[train], user_ids.size, prior_strength=lam)
    test_scores = pairs.diff[~train] @ truth.basis.T
    acc = {name: mean_user_accuracy(np.einsum("nb,nb->n", test_scores, w[user_idx[~train]]), user_idx[~train],
                                    user_ids.size) for name, w in (("device", device_w), ("torch", torch_w))}
    assert abs(acc["device"] - acc["torch"]) <= 0.005, acc
    # One strictly convex objective: the device solver must reach the torch fit's objective or better (here torch's
    # L-BFGS on softmax parameters stops short for some users whose optimum lies near a face of the simplex).
    train_scores = pairs.diff[train].astype(np.float64) @ truth.basis.T
    objective = {name: few_shot_objective(w, train_scores, user_idx[train], lam)
                 for name, w in (("device", device_w), ("torch", torch_w))}
    assert (objective["device"] <= objective["torch"] + 1e-6).all()


def test_incremental_adaptation_equals_fitting_all_choices_at_once():
    rng = np.random.default_rng(1)
    basis, diff = rng.standard_normal((6, 32)), rng.standard_normal((30, 32)) * 0.2
    first = personalize.adapt(basis, diff[:10]).user_weights
    warm = personalize.adapt(basis, diff, init=first)
    assert np.allclose(warm.user_weights, personalize.adapt(basis, diff).user_weights, atol=1e-6)


def test_strength_interpolates_from_population_to_personal_and_off():
    w = np.array([0.7, 0.2, 0.1, 0.0])
    uniform = np.full(4, 0.25)
    assert np.allclose(personalize.effective_weights(w, 0.0, 4), uniform)
    assert np.allclose(personalize.effective_weights(w, 1.0, 4), w)
    assert np.allclose(personalize.effective_weights(w, 0.5, 4), (uniform + w) / 2)
    assert np.allclose(personalize.effective_weights(w, personalize.parse_strength("off"), 4), uniform)
    with pytest.raises(ValueError, match="strength"):
        personalize.parse_strength("1.5")
    assert str(personalize.parse_strength("-0")) == "0.0"  # printed -0.0 (a tester)
    from client.device.state import _checked_strength

    assert str(_checked_strength(-0.0, Path("manifest.json"))) == "0.0"  # ... and so did a state stored with it


# --- 3. ranking parity with the full pipeline -----------------------------------------------------------------


def test_onnx_encoder_matches_transformers_embeddings(encoder_dir, reference, exchanges):
    long_history = [{"role": "user", "content": "Tell me about bread. " * 40},
                    {"role": "assistant", "content": "Bread is made of flour, water and yeast. " * 30},
                    {"role": "user", "content": "And sourdough?"}]
    contexts = [[{"role": "user", "content": ex.prompt}] for ex in exchanges[:6]] + [long_history] * 2
    responses = [ex.candidates[i % 4] for i, ex in enumerate(exchanges[:6])] + ["Wild yeast. " * 200, "Café ☕ ok"]
    from lore_core.embeddings import render_context

    got = OnnxPairEncoder(encoder_dir).embed([render_context(c) for c in contexts], responses)
    assert np.abs(got - reference.embed(contexts, responses, progress=False)).max() < 1e-5


def test_the_encoder_refuses_what_is_not_two_lists_of_strings(encoder_dir):
    """Found by a tester: embed("abc", "xyz") embedded three one-character pairs, an int response reached the
    tokenizer's "TextInputSequence must be str", and batch_size 0 a range() error."""
    from client.device.encoder import EncoderError

    encoder = OnnxPairEncoder(encoder_dir)
    for contexts, responses, batch, says in [("abc", "xyz", 8, "contexts must be a list of strings"),
                                             (["a"], [3], 8, "responses must be a list of strings"),
                                             (["a"], [None], 8, "responses must be a list of strings"),
                                             (["a"], ["b"], 0, "batch_size must be a whole number"),
                                             (5, ["b"], 8, "contexts must be a list of strings, got int")]:
        with pytest.raises(EncoderError, match=says):
            encoder.embed(contexts, responses, batch_size=batch)
    assert encoder.embed(("a",), ["b"]).shape == (1, encoder.dim)


def test_device_ranking_agrees_with_full_pipeline(tmp_path, basis_file, encoder_dir, reference, exchanges):
    basis = load_basis(basis_file).basis
    train, held_out = exchanges[:12], exchanges[12:20]
    choices = tmp_path / "choices.json"
    choices.write_text(json.dumps(_choices(train, reference, basis, np.array([0.6, 0.3, 0.1, 0.0, 0.0]))))
    state = tmp_path / "state"
    device(state, "init", "--basis", basis_file, "--encoder", encoder_dir)
    device(state, "adapt", "--choices", choices)

    # The full pipeline: transformers embeddings, the same basis, w fitted from the same choices.
    records = json.loads(choices.read_text())
    ctx = [[{"role": "user", "content": r["prompt"]}] for r in records]
    diff = (reference.embed(ctx, [r["chosen"] for r in records], progress=False)
            - reference.embed(ctx, [r["rejected"] for r in records], progress=False))
    w_pipeline = personalize.adapt(basis, diff, prior_pairs=DEVICE_PRIOR_PAIRS).user_weights
    assert np.allclose(load_state(state).user_weights, w_pipeline, atol=1e-4)
    w_eff = personalize.effective_weights(w_pipeline, 0.8, basis.shape[0])
    for ex in held_out:
        candidates = tmp_path / "candidates.txt"
        candidates.write_text("\n".join(ex.candidates))
        proc, _ = device(state, "rank", "--prompt", ex.prompt, "--candidates", candidates, "--strength", "0.8",
                         "--json")
        reply = json.loads(proc.stdout)
        got = reply["ranking"]
        emb = reference.embed([[{"role": "user", "content": ex.prompt}]] * 4, list(ex.candidates), progress=False)
        expected = ranking.candidate_rewards(basis, w_eff, emb)
        assert [row["index"] for row in got] == ranking.rank_order(expected).tolist()
        assert np.allclose([row["score"] for row in got], np.sort(expected)[::-1], atol=1e-5)
        # Each reward comes with its 90 % posterior interval; P(i beats j) + P(j beats i) = 1.
        assert all(row["interval_90"][0] < row["interval_90"][1] for row in got)
        prefer = np.asarray(reply["preference_probability"])
        assert prefer.shape == (4, 4) and np.allclose(prefer + prefer.T, 1.0, atol=1e-3)
        assert reply["personalized"] is True
    # Found by a tester: at strength off (or 0) the ranking is the population reward, yet said "personalized": true
    for strength in ("off", "0"):
        proc, _ = device(state, "rank", "--prompt", "p", "--candidates", candidates, "--strength", strength, "--json")
        reply = json.loads(proc.stdout)
        assert reply["personalized"] is False and reply["personalization"].startswith("not applied at strength")
    device(state, "strength", "off")  # a tester: `status` said "personal: learned from 6 answers" under off
    status = json.loads(device(state, "status")[0].stdout)
    assert status["personalization"].startswith("not applied at strength off: the population reward (the state: "
                                                "personal")


# --- 4. crash safety ------------------------------------------------------------------------------------------

WRITER = """
import json, sys
from dataclasses import replace
import numpy as np
from client.device.state import load_state, save_state
state = load_state(sys.argv[1])
print("ready", flush=True)
for i in range(state.generation, 10**9):
    n = i % 7 + 1
    state = save_state(replace(state, user_weights=np.full(state.basis.rank, 1 / state.basis.rank),
                               pair_diff=np.full((n, state.basis.dim), i, np.float32),
                               choices=tuple(json.dumps({"precomputed": f"c.npz#{i}"}) for _ in range(n))))
"""


def test_killing_a_writer_leaves_a_readable_consistent_state(tmp_path, basis_file):
    state_dir = tmp_path / "state"
    save_state(new_state(state_dir, load_basis(basis_file)))
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last = -1
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir)], stdout=subprocess.PIPE, env=env,
                                  text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        state = load_state(state_dir)  # never raises: the old or the new state, intact
        i = int(state.pair_diff[0, 0])
        assert i >= last and state.n_pairs == i % 7 + 1
        assert (state.pair_diff == i).all()
        assert state.choices == (json.dumps({"precomputed": f"c.npz#{i}"}),) * state.n_pairs
        last = i
    assert last > 0, "the writer never committed: the test did not exercise anything"


def test_a_reader_racing_a_writer_reads_the_new_state_not_a_corrupted_one(tmp_path, monkeypatch):
    """Found by a tester: `status` run while `adapt` committed read the old manifest, then found its personal file
    deleted by the commit, and exited 2 calling the state corrupted."""
    import client.device.state as state_module

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    first = save_state(replace(new_state(state_dir, load_basis(basis)), pair_diff=np.ones((1, 8), np.float32),
                               choices=('{"precomputed": "c.npz#1"}',)))
    checked, raced = state_module._checked_file, []

    def commit_then_check(directory, entry):  # another process commits between the manifest read and this one
        if entry["name"].startswith("personal-") and not raced:
            raced.append(save_state(replace(first, pair_diff=np.full((2, 8), 2, np.float32),
                                            choices=('{"precomputed": "c.npz#2"}',) * 2)))
        return checked(directory, entry)

    monkeypatch.setattr(state_module, "_checked_file", commit_then_check)
    state = load_state(state_dir)
    assert raced and state.n_pairs == 2 and state.generation == raced[0].generation
    (state_dir / next(iter(state_dir.glob("personal-*.npz"))).name).write_bytes(b"damaged")
    with pytest.raises(StateCorruptError, match="personal-"):  # real damage is still reported (no retry loop)
        load_state(state_dir)


def test_init_after_a_concurrent_or_killed_init_is_not_refused_as_another_tools_directory(tmp_path):
    """Found by a tester: two `init`s at once on a new directory (3 times in 10 with the same basis), or an `init`
    killed after taking its lock, left `.lock` (and a temp file) before the marker; every later `init` refused the
    directory as one that "holds other files and is not a device state". A directory with anything else (another
    tool's manifest.json included) is still refused."""
    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".lock").touch()
    (state_dir / "..lore-fed-device-state.k3j9.tmp").write_bytes(b"lore-")
    device(state_dir, "init", "--basis", basis)
    assert load_state(state_dir).basis.dim == 8 and not list(state_dir.glob("*.tmp"))
    for other in ("notes.txt", "manifest.json"):
        foreign = tmp_path / other.split(".")[0]
        foreign.mkdir()
        (foreign / ".lock").touch()
        (foreign / other).write_text("{}")
        proc, _ = device(foreign, "init", "--basis", basis, "--reinit", check=False)
        assert proc.returncode == 2 and "holds other files" in proc.stderr
        assert sorted(p.name for p in foreign.iterdir()) == [".lock", other]


def test_a_directory_holding_only_a_lock_file_is_no_state_and_init_makes_one_there(tmp_path, capsys):
    """A review: a killed `forget --all` (or `init`) leaves a directory holding only `.lock`; the commands that write
    refused it as "not a device state ... Pass the directory given to `init`", as if it were another tool's folder
    (and the interrupted forget's own advice, "run the command again", led there). They now say there is no state and
    how to make one, change nothing, and `init` makes one there."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".lock").touch()
    for command in (["forget"], ["strength", "0.5"], ["status"]):
        assert device_cli.main(["--state", str(state_dir), *command]) == 2
        err = capsys.readouterr().err
        assert f"no device state in {state_dir}" in err and "init --basis FILE" in err, err
        assert [p.name for p in state_dir.iterdir()] == [".lock"]
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis)]) == 0
    assert load_state(state_dir).n_pairs == 0


# --- 5. checked state, refused bases, forgetting --------------------------------------------------------------


def _adapted_state(tmp_path, basis_file) -> Path:
    state_dir = tmp_path / "state"
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "diff.npz", diff=rng.standard_normal((8, 384)).astype(np.float32) * 0.1)
    device(state_dir, "init", "--basis", basis_file)
    device(state_dir, "adapt", "--choices", tmp_path / "diff.npz")
    return state_dir


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupted_or_truncated_state_is_reported_not_used(tmp_path, basis_file, damage):
    state_dir = _adapted_state(tmp_path, basis_file)
    personal = next(state_dir.glob("personal-*.npz"))
    if damage == "truncate":
        personal.write_bytes(personal.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(personal.read_bytes())
        data[len(data) // 2] ^= 0xFF
        personal.write_bytes(bytes(data))
    else:
        (state_dir / "manifest.json").write_text('{"format": "lore-fed-device-state/1", "gener')
    with pytest.raises(StateCorruptError, match="manifest" if damage == "manifest" else personal.name):
        load_state(state_dir)
    for module in ("client.device", "lore_cli.main"):  # `lore-fed device` said nothing of the repair (a tester)
        proc, _ = device(state_dir, "status", module=module, check=False)
        assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
        assert "`init --reinit --basis FILE` repairs the state" in proc.stderr, (module, proc.stderr)
    proc, _ = device(state_dir, "forget")  # forget deletes the data anyway: it does not tell the user to forget
    assert "repairs the state, keeping" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("key, value, says", [
    ("choices", np.array(['{"chosen": "a"}'] * 2), "stored choice 1: needs exactly one of 'history' or 'prompt'"),
    ("choices", np.array(["not json"] * 2), "stored choice 1 is not JSON"),
    ("user_weights", np.array(["a"] * 3), "user_weights (<U1)"),
    ("posterior_cov", -np.eye(2), "positive definite"),
    ("attributes", np.str_('{"age": {"band": 5}}'), "attributes must be a JSON object of strings"),
    ("user_weights", np.array([np.nan, 0.5, 0.5]), "got [nan 0.5 0.5]"),  # a tester read "got (3,)": the shape
])
def test_a_personal_file_another_tool_wrote_is_reported_naming_it(tmp_path, capsys, key, value, says):
    """Found by a tester: a personal file whose checksum the manifest vouches for (another tool's, or an older
    writer's) but whose stored choices lacked a key, or whose weights were strings, ended `adapt` or `status` in a
    KeyError or TypeError traceback, or in a bare 'Expecting value: line 1 column 1' naming no file. Every array
    is now checked where the state is loaded: exit 2 naming the file, and `forget` still deletes it."""
    import hashlib
    import io

    from client.device import device_cli
    from client.device.state import MANIFEST

    state_dir = _state_with_choices(tmp_path)
    save_state(replace(load_state(state_dir), user_weights=np.full(3, 1 / 3), posterior_mode=np.zeros(2),
                       posterior_cov=np.eye(2)))
    manifest = json.loads((state_dir / MANIFEST).read_text())
    entry = manifest["files"]["personal"]
    with np.load(state_dir / entry["name"]) as data:
        arrays = {**data, key: value}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (state_dir / entry["name"]).write_bytes(buffer.getvalue())
    entry.update(bytes=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (state_dir / MANIFEST).write_text(json.dumps(manifest))
    for command in ("status", "forget"):
        code = device_cli.main(["--state", str(state_dir), command])
        err = capsys.readouterr().err
        assert entry["name"] in err and says in err and "Traceback" not in err, err
    assert code == 0 and not list(state_dir.glob("personal-*"))


def test_a_state_stored_by_an_earlier_adapt_still_loads(tmp_path, capsys):
    """Found by a review: the load-time check of stored choices (5722d65) applied today's input rules, so a state
    holding a choice with two equal responses, which `adapt` stored before it refused them, was refused by every
    command and could only be deleted. Stored choices are checked for their shape alone."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    earlier = json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})
    save_state(replace(load_state(state_dir), pair_diff=np.r_[np.zeros((1, 8)), np.ones((1, 8))].astype(np.float32),
                       choices=(earlier, json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}))))
    assert device_cli.main(["--state", str(state_dir), "status"]) == 0, capsys.readouterr().err
    shapeless = (json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}), earlier)
    with pytest.raises(StateError, match="stored choice 1: 'chosen' must be a string"):  # as load_state refuses it
        save_state(replace(load_state(state_dir), choices=shapeless))


def test_basis_of_another_dimension_or_version_is_refused_unless_reinit(tmp_path, basis_file):
    state_dir = _adapted_state(tmp_path, basis_file)
    rng = np.random.default_rng(3)
    other_dim = save_basis(tmp_path / "d8.npz", rng.standard_normal((5, 8)), version=7, embedder="tiny")
    newer = save_basis(tmp_path / "v8.npz", rng.standard_normal((5, 384)), version=8,
                       embedder=load_basis(basis_file).embedder)
    for path, word in ((other_dim, "dimension 8"), (newer, "version 8")):
        proc, _ = device(state_dir, "init", "--basis", path, check=False)
        assert proc.returncode == 2 and word in proc.stderr and "--reinit" in proc.stderr
        with pytest.raises(BasisMismatchError):
            check_compatible(load_state(state_dir), load_basis(path))
    assert load_state(state_dir).basis.version == 7
    run = tmp_path / "run"  # a run directory holding basis.npz, as `lore-fed evaluate --basis` takes (a tester)
    run.mkdir()
    newer.replace(run / "basis.npz")
    device(state_dir, "init", "--basis", run, "--reinit")
    state = load_state(state_dir)
    assert state.basis.version == 8 and state.n_pairs == 8 and state.user_weights is not None


def test_reinit_to_another_embedding_space_never_drops_the_users_choices(tmp_path, basis_file, encoder_dir):
    """Found by a hostile-input test: `init --reinit` with a basis of another dimension exited 0 after "dropped N
    stored choices" (the user's answers gone for good) and kept a 384-d encoder that no longer fit, so rank and
    adapt failed afterwards. Now nothing changes unless the choices can be re-embedded; `forget` drops them."""
    state_dir = _adapted_state(tmp_path, basis_file)  # 8 precomputed pairs, no texts
    other_dim = save_basis(tmp_path / "d8.npz", np.random.default_rng(3).standard_normal((5, 8)), version=9,
                           embedder="tiny")
    before = {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"}
    proc, _ = device(state_dir, "init", "--basis", other_dim, "--reinit", check=False)
    assert proc.returncode == 2 and "forget" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # no encoder re-embeds pairs without texts: not "pass --encoder DIR" (a tester)
    assert "precomputed pairs without texts" in proc.stderr and "--encoder" not in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    texts, choices = tmp_path / "texts", tmp_path / "c.jsonl"
    choices.write_text(json.dumps({"prompt": "Which?", "chosen": "this one", "rejected": "that one"}))
    device(texts, "init", "--basis", basis_file, "--encoder", encoder_dir)
    device(texts, "adapt", "--choices", choices)
    proc, _ = device(texts, "init", "--basis", other_dim, "--reinit", check=False)  # the 384-d encoder cannot
    assert proc.returncode == 2 and "does not fit" in proc.stderr and load_state(texts).n_pairs == 1
    device(state_dir, "forget")
    device(state_dir, "init", "--basis", other_dim, "--reinit")
    assert load_state(state_dir).basis.dim == 8 and load_state(state_dir).n_pairs == 0
    device(texts, "forget")  # nothing stored: the 384-d encoder is not kept (a review found `forget --all` the
    proc, _ = device(texts, "init", "--basis", other_dim, "--reinit")  # only way out)
    assert "is not kept" in proc.stderr and load_state(texts).encoder is None and load_state(texts).basis.dim == 8


def test_choices_that_are_not_choices_are_named_for_what_they_are(tmp_path, basis_file):
    """A tester's pretty-printed JSON object was refused as "line 1: not valid JSON", and a NaN diff as "must be
    finite floats (n, 384) ... got float32 (1, 384)", which reads as a shape problem. Exit 2, state unchanged."""
    state_dir = _adapted_state(tmp_path, basis_file)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"}
    pretty = tmp_path / "metrics.json"
    pretty.write_text(json.dumps({"seen_test_acc": 0.7, "rank": 2}, indent=2))
    nan = tmp_path / "nan.npz"
    np.savez(nan, diff=np.full((1, 384), np.nan, np.float32))
    for path, expected in ((pretty, "a JSON dict, not choices"), (nan, "384 values that are not finite")):
        proc, _ = device(state_dir, "adapt", "--choices", path, check=False)
        assert proc.returncode == 2 and expected in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    lines = tmp_path / "one.jsonl"  # JSON Lines and a one-line JSON list still read
    lines.write_text(json.dumps({"prompt": "Which?", "chosen": "a", "rejected": "b"}) + "\n")
    one_line_list = tmp_path / "list.json"
    one_line_list.write_text(json.dumps([{"prompt": "Which?", "chosen": "a", "rejected": "b"}]))
    from client.device.personalize import read_choices

    assert len(read_choices(lines)) == len(read_choices(one_line_list)) == 1
    # A line ends at "\n" only: U+2028 stands unescaped in a JSON string (json.dumps(ensure_ascii=False) writes it);
    # split there, one choice read as a pretty-printed object (a reviewer).
    lines.write_text(json.dumps({"prompt": "Which?", "chosen": "a\u2028b", "rejected": "c"}, ensure_ascii=False))
    assert read_choices(lines)[0]["chosen"] == "a\u2028b"
    from client.device.pool import PoolError, read_pool

    pretty.write_text(json.dumps({"prompt": "Which?", "responses": ["a", "b"]}, indent=2))
    with pytest.raises(PoolError, match="a JSON dict, not a pool"):  # it read "no pairs in the pool"
        read_pool(pretty, 384)


def _fake_encoder_dir(directory: Path, checksums=None, *, model: bytes = b"not a model",
                      embedder: str = "synthetic") -> Path:
    """An 8-d encoder directory whose encoder.json is well-formed but for `checksums` (None: the files' true digests;
    the files are not a model: enough for every check made before a command loads it). Written again over an
    existing one, it stands for another `export-encoder` into the same directory."""
    from client.device.encoder import (
        ENCODER_FORMAT,
        ENCODER_META,
        MODEL_FILE,
        OUTPUT_NAME,
        TOKENIZER_FILE,
        file_sha256,
    )

    directory.mkdir(exist_ok=True)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        (directory / name).write_bytes(model)
    if checksums is None:
        checksums = {name: file_sha256(directory / name) for name in (MODEL_FILE, TOKENIZER_FILE)}
    meta = {"format": ENCODER_FORMAT, "dim": 8, "output": OUTPUT_NAME, "embedder": embedder, "sha256": checksums}
    (directory / ENCODER_META).write_text(json.dumps(meta))
    return directory


@pytest.mark.parametrize("field, text", [("dim", "Infinity"), ("max_length", "Infinity"), ("embedder", "5"),
                                         ("embedder", '["toy"]'), ("dim", "8.9"), ("dim", "true"), ("dim", '"8"'),
                                         ("max_length", "256.5")])
def test_an_encoder_json_with_a_number_that_is_not_finite_or_an_embedder_that_is_no_name_is_refused(
        tmp_path, capsys, field, text):
    """Found by a tester: an encoder.json (hand-edited, or another tool's) with "dim": Infinity or "max_length":
    Infinity, which Python's json reads, ended init and rank in an OverflowError traceback, and "embedder": 5 in a
    TypeError traceback. Each is now refused naming the file (exit 2)."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    encoder = _fake_encoder_dir(tmp_path / "enc", embedder="toy")
    meta = json.loads((encoder / "encoder.json").read_text())
    meta[field] = "@@"
    (encoder / "encoder.json").write_text(json.dumps(meta).replace('"@@"', text))
    candidates = tmp_path / "answers.txt"
    candidates.write_text("Yes.\nNo.\n")
    assert device_cli.main(["--state", str(state_dir), "rank", "--prompt", "Which?", "--candidates", str(candidates),
                            "--encoder", str(encoder)]) == 2
    err = capsys.readouterr().err
    assert str(encoder / "encoder.json") in err and "Traceback" not in err, err
    assert field in err, err  # a review: 8.9, true or "8" were read as the width 8, 256.5 as 256


@pytest.mark.parametrize("checksums", ["x", {"model.onnx": "x", "tokenizer.json": "x"}, {"model.onnx": "0" * 64},
                                       {"model.onnx": "A" * 64, "tokenizer.json": "a" * 64}])
def test_an_encoder_checksum_that_is_not_a_sha256_digest_is_refused_when_read(tmp_path, checksums):
    """Found by a review: `"sha256": "x"` was accepted and failed only at a verified open, with a traceback."""
    from client.device.encoder import EncoderError, read_encoder_meta

    enc = _fake_encoder_dir(tmp_path / "enc", checksums)
    with pytest.raises(EncoderError, match=r"encoder\.json: expected \"sha256\".* 64 lowercase hex characters"):
        read_encoder_meta(enc)


def test_init_refuses_an_encoder_checksum_that_is_not_a_sha256_digest(tmp_path):
    save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="synthetic")
    enc = _fake_encoder_dir(tmp_path / "enc", "x")
    proc, _ = device(tmp_path / "state", "init", "--basis", tmp_path / "basis.npz", "--encoder", enc, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{enc / 'encoder.json'}: expected" in proc.stderr and '64 lowercase hex characters; got "x"' in proc.stderr


def test_adapting_on_the_same_choices_again_does_not_count_them_twice(tmp_path, basis_file, encoder_dir):
    """Found by a hostile-input test: a rerun of `adapt` after an interruption doubled the choices and moved w."""
    state_dir = _adapted_state(tmp_path, basis_file)  # 8 precomputed pairs from diff.npz
    w, generation = load_state(state_dir).user_weights, load_state(state_dir).generation
    proc, _ = device(state_dir, "adapt", "--choices", tmp_path / "diff.npz")
    assert "skipped 8 of 8" in proc.stderr and load_state(state_dir).n_pairs == 8
    assert load_state(state_dir).generation == generation  # nothing new, nothing written
    np.testing.assert_allclose(load_state(state_dir).user_weights, w)
    texts, choices = tmp_path / "texts", tmp_path / "c.jsonl"
    choices.write_text("\n".join(json.dumps({"prompt": "Which?", "chosen": f"answer {i}", "rejected": "no"})
                                 for i in range(3)))
    device(texts, "init", "--basis", basis_file, "--encoder", encoder_dir)
    device(texts, "adapt", "--choices", choices)
    choices.write_text(choices.read_text() + "\n" + json.dumps({"prompt": "Which?", "chosen": "new", "rejected": "no"}))
    proc, _ = device(texts, "adapt", "--choices", choices)
    assert "skipped 3 of 4" in proc.stderr and load_state(texts).n_pairs == 4
    assert "the other way" not in proc.stderr
    # The same pair answered the other way is a second answer, kept, and said so (a tester took it for a missed
    # duplicate).
    choices.write_text(json.dumps({"prompt": "Which?", "chosen": "no", "rejected": "answer 0"}))
    proc, _ = device(texts, "adapt", "--choices", choices)
    assert "note: 1 of the new choices answer a pair the other way from an earlier answer" in proc.stderr
    assert load_state(texts).n_pairs == 5
    # Both ways in one new file: noted too (a tester).
    choices.write_text(json.dumps({"prompt": "Again?", "chosen": "p", "rejected": "q"}) + "\n" +
                       json.dumps({"prompt": "Again?", "chosen": "q", "rejected": "p"}))
    proc, _ = device(texts, "adapt", "--choices", choices)
    assert "note: 1 of the new choices answer a pair the other way" in proc.stderr and load_state(texts).n_pairs == 7
    # Another user's file after this user's: refused (a reviewer; one file of several users already was).
    for user, pairs in (("alice", 8), ("bob", 8)):
        choices.write_text(json.dumps({"user": user, "prompt": "Whose?", "chosen": user, "rejected": "z"}))
        proc, _ = device(texts, "adapt", "--choices", choices, check=False)
        assert load_state(texts).n_pairs == pairs
    assert proc.returncode == 2 and "choices of user bob, but the device state holds choices of user alice" in \
        proc.stderr
    # Precomputed pairs likewise: a row that negates a stored one (they got no note; a tester).
    diff = np.load(tmp_path / "diff.npz")["diff"]
    np.savez(tmp_path / "negated.npz", diff=np.concatenate([-diff[:2], diff[:1] + 1]))
    proc, _ = device(state_dir, "adapt", "--choices", tmp_path / "negated.npz")
    assert "note: 2 of the new choices answer a pair the other way" in proc.stderr
    assert load_state(state_dir).n_pairs == 11


def test_a_tampered_encoder_setting_is_reported_by_name(tmp_path, basis_file, encoder_dir):
    """Found by a hostile-input test: `"encoder": 5` in the manifest gave a TypeError traceback, and max_length -5
    in encoder.json an OverflowError."""
    import shutil

    from client.device.encoder import EncoderError, OnnxPairEncoder

    state_dir = _adapted_state(tmp_path, basis_file)
    manifest = json.loads((state_dir / "manifest.json").read_text())
    (state_dir / "manifest.json").write_text(json.dumps({**manifest, "encoder": 5}))
    with pytest.raises(StateCorruptError, match="encoder must be a directory path"):
        load_state(state_dir)
    (state_dir / "manifest.json").write_text(json.dumps(manifest))
    (state_dir / ".lock").unlink(missing_ok=True)
    (state_dir / ".lock").mkdir()  # a raw "[Errno 21]" before
    proc, _ = device(state_dir, "forget", check=False)
    assert proc.returncode == 2 and ".lock is a directory" in proc.stderr
    bad = shutil.copytree(encoder_dir, tmp_path / "enc")
    meta = json.loads((bad / "encoder.json").read_text())
    (bad / "encoder.json").write_text(json.dumps({**meta, "max_length": -5}))
    with pytest.raises(EncoderError, match="encoder.json: max_length -5"):
        OnnxPairEncoder(bad)


def test_an_encoder_given_on_the_command_line_is_checked_like_one_given_at_init(tmp_path, basis_file, encoder_dir):
    """Found by a hostile-input test: checksums were checked only at `init`, so an --encoder override with a damaged
    model was used unchecked."""
    import shutil

    state_dir = tmp_path / "state"
    device(state_dir, "init", "--basis", basis_file)
    bad = shutil.copytree(encoder_dir, tmp_path / "enc")
    model = next(p for p in bad.iterdir() if p.suffix == ".onnx")
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    choices = tmp_path / "c.jsonl"
    choices.write_text(json.dumps({"prompt": "Which?", "chosen": "this one", "rejected": "that one"}))
    proc, _ = device(state_dir, "adapt", "--choices", choices, "--encoder", bad, check=False)
    assert proc.returncode == 2 and model.name in proc.stderr and load_state(state_dir).n_pairs == 0, proc.stderr


def test_another_model_exported_into_the_states_encoder_directory_is_refused_by_every_command_that_embeds(tmp_path):
    """Found by a review: the state recorded only its encoder's directory, so another model of the same dimension
    exported there later embedded new choices, candidates and pool pairs while the stored choices and the basis
    belonged to the old one: wrong rewards, no message."""
    basis = save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="model-a")
    enc = _fake_encoder_dir(tmp_path / "enc", model=b"model a", embedder="model-a")
    state_dir = tmp_path / "state"
    device(state_dir, "init", "--basis", basis, "--encoder", enc)
    stored = json.dumps({"prompt": "Which?", "chosen": "this", "rejected": "that"})
    save_state(replace(load_state(state_dir), pair_diff=np.ones((1, 8), np.float32), choices=(stored,)))
    _fake_encoder_dir(enc, model=b"model b", embedder="model-b")  # `export-encoder --out enc --model B`
    choices, candidates, pool = tmp_path / "c.jsonl", tmp_path / "answers.txt", tmp_path / "pool.jsonl"
    choices.write_text(json.dumps({"prompt": "Which?", "chosen": "yes", "rejected": "no"}))
    candidates.write_text("Yes.\nNo.\n")
    pool.write_text(json.dumps({"prompt": "Which one?", "responses": ["yes", "no"]}))
    new_basis = save_basis(tmp_path / "b.npz", np.eye(2, 8), version=2, embedder="model-b")
    before = {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"}
    for args in [("rank", "--prompt", "Which?", "--candidates", candidates), ("adapt", "--choices", choices),
                 ("next-question", "--candidates", pool), ("init", "--basis", new_basis, "--reinit")]:
        proc, _ = device(state_dir, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{enc.resolve()}: the encoder there was replaced" in proc.stderr, proc.stderr
        assert "it is now 'model-b', the state was set up with 'model-a'" in proc.stderr
        assert "1 stored choices" in proc.stderr
        assert f"init --reinit --basis FILE --encoder {enc.resolve()}" in proc.stderr
    assert {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_state_without_choices_moving_to_the_new_models_basis_records_the_new_model(tmp_path):
    """A review: with no stored choices, `init --reinit --basis B_BASIS` (another model's basis, no --encoder)
    kept the encoder directory, now holding model B, under model A's recorded identity, so every later command
    refused the state as holding a replaced encoder. Nothing stored was embedded by A: B is recorded."""
    from client.device.encoder import encoder_identity, read_encoder_meta

    basis = save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="model-a")
    enc = _fake_encoder_dir(tmp_path / "enc", model=b"model a", embedder="model-a")
    state_dir = tmp_path / "state"
    device(state_dir, "init", "--basis", basis, "--encoder", enc)
    _fake_encoder_dir(enc, model=b"model b", embedder="model-b")
    new_basis = save_basis(tmp_path / "b.npz", np.eye(2, 8), version=2, embedder="model-b")
    device(state_dir, "init", "--basis", new_basis, "--reinit")
    assert load_state(state_dir).encoder_identity == encoder_identity(read_encoder_meta(enc))


def _replace_tokenizer_file(enc: Path) -> None:
    """Another export into `enc` that still runs: tokenizer.json re-serialised (other bytes), its digest recorded."""
    from client.device.encoder import file_sha256

    tokenizer, meta_path = enc / "tokenizer.json", enc / "encoder.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sha256": {**meta["sha256"], "tokenizer.json": file_sha256(tokenizer)}}))


def test_init_with_the_encoder_records_what_its_directory_holds_now(tmp_path, basis_file, encoder_dir):
    """The ways out the refusal names: an --encoder for one command is not compared with the record, and
    `init --basis FILE --encoder DIR` records what DIR holds now."""
    import shutil

    enc, state_dir, candidates = shutil.copytree(encoder_dir, tmp_path / "enc"), tmp_path / "state", tmp_path / "a.txt"
    candidates.write_text("Yes.\nNo.\n")
    device(state_dir, "init", "--basis", basis_file, "--encoder", enc)
    meta = json.loads((enc / "encoder.json").read_text())
    assert load_state(state_dir).encoder_identity == {"embedder": meta["embedder"], "sha256": meta["sha256"]}
    _replace_tokenizer_file(enc)
    proc, _ = device(state_dir, "rank", "--prompt", "Which?", "--candidates", candidates, check=False)
    assert proc.returncode == 2 and "was replaced" in proc.stderr, proc.stderr
    device(state_dir, "rank", "--prompt", "Which?", "--candidates", candidates, "--encoder", encoder_dir)
    device(state_dir, "init", "--basis", load_state(state_dir).basis.source, "--encoder", enc)
    device(state_dir, "rank", "--prompt", "Which?", "--candidates", candidates)


def test_a_state_set_up_before_encoders_were_recorded_is_not_checked(tmp_path, basis_file, encoder_dir):
    """Such a manifest has no encoder_identity: its commands work as before, and a later write records none (only
    setting the encoder, `init --encoder`, records one)."""
    import shutil

    from client.device.state import MANIFEST

    enc, state_dir, candidates = shutil.copytree(encoder_dir, tmp_path / "enc"), tmp_path / "state", tmp_path / "a.txt"
    candidates.write_text("Yes.\nNo.\n")
    device(state_dir, "init", "--basis", basis_file, "--encoder", enc)
    manifest = json.loads((state_dir / MANIFEST).read_text())
    del manifest["encoder_identity"]
    (state_dir / MANIFEST).write_text(json.dumps(manifest))
    _replace_tokenizer_file(enc)
    device(state_dir, "rank", "--prompt", "Which?", "--candidates", candidates)
    device(state_dir, "strength", "0.5")
    assert load_state(state_dir).encoder_identity is None


_DIGESTS = {"model.onnx": "a" * 64, "tokenizer.json": "b" * 64}


@pytest.mark.parametrize("encoder, identity", [
    ("/enc", "x"), ("/enc", {"sha256": _DIGESTS}), ("/enc", {"embedder": 5, "sha256": _DIGESTS}),
    ("/enc", {"embedder": "m", "sha256": {"model.onnx": "a" * 64}}),
    ("/enc", {"embedder": "m", "sha256": {**_DIGESTS, "tokenizer.json": "B" * 64}}),
    ("/enc", {"embedder": "m", "sha256": _DIGESTS, "more": 1}), (None, {"embedder": "m", "sha256": _DIGESTS}),
])
def test_a_damaged_encoder_identity_in_the_manifest_is_reported_as_corruption(tmp_path, encoder, identity):
    from client.device.state import MANIFEST

    state_dir = _toy_state(tmp_path)
    manifest = json.loads((state_dir / MANIFEST).read_text())
    (state_dir / MANIFEST).write_text(json.dumps({**manifest, "encoder": encoder, "encoder_identity": identity}))
    with pytest.raises(StateCorruptError, match="encoder_identity must be null, or with an encoder"):
        load_state(state_dir)


def test_forget_deletes_all_personal_data(tmp_path, basis_file, encoder_dir):
    state_dir = tmp_path / "state"
    secret = "my secret preference for pineapple pizza"
    choices = tmp_path / "c.jsonl"
    choices.write_text(json.dumps({"prompt": "Which pizza?", "chosen": secret, "rejected": "Margherita."}))
    device(state_dir, "init", "--basis", basis_file, "--encoder", encoder_dir)
    device(state_dir, "adapt", "--choices", choices)

    def on_disk() -> bool:  # numpy stores str arrays as UTF-32
        blobs = [p.read_bytes() for p in state_dir.iterdir() if p.is_file()]
        return any(secret.encode(codec) in blob for blob in blobs for codec in ("utf-8", "utf-32-le"))

    assert on_disk()
    device(state_dir, "forget")
    assert not on_disk()
    assert not list(state_dir.glob("personal-*")) and not list(state_dir.glob(".*.tmp"))
    state = load_state(state_dir)
    assert state.user_weights is None and state.n_pairs == 0 and state.choices == ()
    device(state_dir, "forget", "--all")
    assert not state_dir.exists()


def test_forget_all_racing_a_waiting_command_removes_the_state_and_the_command_says_so(tmp_path, monkeypatch):
    """Found by a tester: `adapt` started during `forget --all` re-opened `.lock` after forget deleted it; forget
    then kept the directory, naming `.lock` as "not part of the device state", and the `.lock`-only directory was
    refused by every command, `forget --all` included. An `adapt` whose directory vanished after its check said
    `[Errno 2] No such file or directory: '.../.lock'`."""
    import client.device.state as state_module
    from client.device.state import MARKER, StateError, forget, state_lock

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    save_state(new_state(state_dir, load_basis(basis)))
    unlink = Path.unlink

    def waiting_command_reopens_the_lock(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if path.name == MARKER:  # the last file forget deletes
            (path.parent / ".lock").touch()

    monkeypatch.setattr(Path, "unlink", waiting_command_reopens_the_lock)
    assert forget(state_dir, everything=True).notes == [] and not state_dir.exists()
    monkeypatch.setattr(Path, "unlink", unlink)

    save_state(new_state(state_dir, load_basis(basis)))
    real_require = state_module.require_state

    def checked_then_deleted(directory):
        real_require(directory)
        state_module._delete_state(Path(directory))  # `forget --all` in another process, between check and lock
        return Path(directory)

    monkeypatch.setattr(state_module, "require_state", checked_then_deleted)
    with pytest.raises(StateError, match="deleted while this command started"):
        with state_lock(state_dir):
            pass


def _toy_choices_and_state(tmp_path) -> Path:
    """A fresh state of a 3 x 8 toy basis (tmp_path/state) and 4 precomputed choices beside it (tmp_path/c.npz)."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    np.savez(tmp_path / "c.npz", diff=np.random.default_rng(1).standard_normal((4, 8)))
    state_dir = tmp_path / "state"
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis)]) == 0
    return state_dir


def test_ctrl_c_during_adapt_says_the_state_is_unchanged_without_a_traceback(tmp_path, monkeypatch, capsys):
    """Found by a tester: Ctrl-C in `python -m client.device adapt` printed a KeyboardInterrupt traceback (`lore-fed
    device` printed a message); the state was intact, which the message now says."""
    from client.device import device_cli, user_posterior

    state_dir = _toy_choices_and_state(tmp_path)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(user_posterior, "refit", interrupted)
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "c.npz")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before
    # `forget --all` deletes file by file: an interrupt there must not claim the state is intact (a review).
    import client.device.state as state_module

    monkeypatch.setattr(state_module, "_delete_state", interrupted)
    assert device_cli.main(["--state", str(state_dir), "forget", "--all"]) == 130
    err = capsys.readouterr().err
    assert "may already be deleted" in err and "as the last completed command" not in err


def test_sigterm_during_adapt_says_so_and_keeps_the_state(tmp_path, monkeypatch, capsys):
    """Found by a tester: `python -m client.device adapt` killed with SIGTERM died silently (status -15) while
    `lore-fed device` said what a rerun does. A real SIGTERM, delivered to this process mid-`adapt`."""
    import os
    import signal

    from client.device import device_cli, user_posterior

    state_dir = _toy_choices_and_state(tmp_path)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop adapt")

    def unhandled(signum, frame):  # stands in for the default action (death) so that a failure is a failed test
        raise RuntimeError("SIGTERM reached the process's own handler: adapt did not handle it")

    monkeypatch.setattr(user_posterior, "refit", terminated)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "c.npz")]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the command restores the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "adapt: terminated (SIGTERM); the device state is as the last completed command left it" in \
        capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before


def test_a_full_disk_is_reported_naming_the_file_and_leaves_the_state_as_it_was(tmp_path, monkeypatch, capsys):
    """Found by a tester: `adapt` (or `strength`, `init`) on a full disk ended in a traceback, `OSError: [Errno 28]
    No space left on device` (exit 1): a failed write or flush names no file, so the CLI took it for an internal
    failure. It is now exit 2 naming the file being written, and the state is as the last command left it."""
    import errno

    from client.device import device_cli
    from lore_core import atomic_io

    state_dir = _toy_choices_and_state(tmp_path)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a flush fails: no file named

    monkeypatch.setattr(atomic_io.os, "fsync", disk_full)
    for args in (["adapt", "--choices", str(tmp_path / "c.npz")], ["strength", "0.5"]):
        assert device_cli.main(["--state", str(state_dir), *args]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and str(state_dir) in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before


@pytest.mark.parametrize("rank", ["Infinity", "2.5", "true", '"2"'])
def test_a_prior_table_whose_rank_is_not_an_integer_is_refused_by_name(tmp_path, rank):
    """Found by a tester: `"rank": Infinity` (which Python's json reads) ended `declare` in an OverflowError
    traceback, and 2.5 or "2" was taken as rank 2."""
    from client.device import attribute_prior

    basis = load_basis(save_basis(tmp_path / "b.npz", np.eye(2, 4), version=1, embedder="toy"))
    table = {"format": attribute_prior.FORMAT, "basis_sha256": basis.sha256, "rank": "@@", "groups": {}}
    (tmp_path / "T.json").write_text(json.dumps(table).replace('"@@"', rank))
    with pytest.raises(attribute_prior.AttributePriorError, match="T.json: rank must be an integer"):
        attribute_prior.read_table(tmp_path / "T.json", basis)


@pytest.mark.parametrize("mean", [["0.5", 0.5], [True, 0.0], "0.5,0.5", [[0.5, 0.5]]])
def test_a_prior_table_whose_mean_is_not_numbers_is_refused_by_name(tmp_path, mean):
    """A tester's table gave a mean as strings (["0.5", 0.1, ...]) and `declare` took it."""
    from client.device import attribute_prior

    basis = load_basis(save_basis(tmp_path / "b.npz", np.eye(2, 4), version=1, embedder="toy"))
    table = {"format": attribute_prior.FORMAT, "basis_sha256": basis.sha256, "rank": 2,
             "groups": {"age": {"18-24": {"users": 30, "mean": mean}}}}
    (tmp_path / "T.json").write_text(json.dumps(table))
    with pytest.raises(attribute_prior.AttributePriorError, match="age='18-24': mean must be 2 weights"):
        attribute_prior.read_table(tmp_path / "T.json", basis)
    table["groups"]["age"]["18-24"]["mean"] = [0.5, 0.5]
    (tmp_path / "T.json").write_text(json.dumps(table))
    attribute_prior.read_table(tmp_path / "T.json", basis)


def test_a_strength_out_of_range_is_named_by_its_flag_and_as_typed(tmp_path, capsys):
    """Found by a tester: `rank --strength 1e400` read "strength must be a number in [0, 1] or 'off', got inf":
    neither the flag nor the value as typed."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    (tmp_path / "answers.txt").write_text("Yes.\nNo.\n")
    assert device_cli.main(["--state", str(state_dir), "rank", "--prompt", "Which?", "--candidates",
                            str(tmp_path / "answers.txt"), "--strength", "1e400"]) == 2
    assert "--strength must be a number in [0, 1] or 'off', got '1e400'" in capsys.readouterr().err


def test_a_closed_output_pipe_ends_the_command_quietly_and_no_other_broken_pipe_does():
    """Found by a tester: `... | head` gave a BrokenPipeError traceback once head had read enough. Only a closed
    stdout ends quietly: a broken pipe elsewhere (a socket, a subprocess) is a failure and keeps its traceback."""
    code = ("import sys; from client.device import device_cli\n"
            "def cut(args):\n    print('x' * 100000, flush=True)\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "device_cli.run = cut\nsys.exit(device_cli.main(['--state', 'x', 'status']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # `| head -c 10`
    assert proc.wait(60) == 141 and b"Traceback" not in proc.stderr.read()
    late = code.replace("print('x' * 100000, flush=True)\n    raise BrokenPipeError(32, 'Broken pipe')",
                        "print('x' * 100)\n    import time; time.sleep(1)")  # buffered; the reader goes first
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", late], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # a review: the flush at exit raised outside the handler ('Exception ignored', exit 120)
    assert proc.wait(60) == 141 and b"BrokenPipe" not in proc.stderr.read()
    code = code.replace("print('x' * 100000, flush=True)", "pass")  # stdout is fine: another pipe broke
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "BrokenPipeError" in proc.stderr


def test_init_reinit_repairs_a_damaged_file_of_the_same_size(tmp_path):
    """Found by a tester: with a byte of the state's basis file flipped, `init --reinit` said "starting afresh" and
    exited 0, but kept the damaged file (a data file of the same name and size was taken as already written), so the
    state stayed corrupted."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis)]) == 0
    stored = next(state_dir.glob("basis-*.npz"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(StateCorruptError):
        load_state(state_dir)
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis), "--reinit"]) == 0
    assert load_state(state_dir).basis.sha256 == load_basis(basis).sha256


def test_a_lost_manifest_never_lets_init_delete_the_stored_choices(tmp_path):
    """Found by a tester: with manifest.json gone (the personal data file still there), `status` said "no device
    state: run init first", and `init` (no --reinit) made a new state and deleted the personal file: the user's
    choices were dropped as a side effect. Now it is a corrupted state: refused, repaired by `forget` or
    `init --reinit` on purpose."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    np.savez(tmp_path / "c.npz", diff=np.random.default_rng(1).standard_normal((4, 8)))
    state_dir = tmp_path / "state"
    for argv in (["init", "--basis", str(basis)], ["adapt", "--choices", str(tmp_path / "c.npz")]):
        assert device_cli.main(["--state", str(state_dir), *argv]) == 0
    (state_dir / "manifest.json").unlink()
    personal = next(state_dir.glob("personal-*.npz"))
    with pytest.raises(StateCorruptError, match="manifest.json: missing"):
        load_state(state_dir)
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis)]) == 2
    assert personal.is_file()
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis), "--reinit"]) == 0
    assert not personal.exists() and load_state(state_dir).n_pairs == 0
    (state_dir / "manifest.json").unlink()  # no personal data: a first init killed before its manifest; init again
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(basis)]) == 0


def test_a_failed_export_leaves_the_out_directory_as_it_was(tmp_path, monkeypatch, encoder_dir):
    """Found by a tester: an export that failed its final check left its encoder in --out with valid checksums,
    for `init` to accept, and over the encoder that states there used. Now it is staged beside --out."""
    import shutil

    from client.device import export
    from client.device.encoder import EncoderError

    assert sorted(path.name for path in encoder_dir.iterdir()) == ["encoder.json", "model.onnx", "tokenizer.json"]
    out = tmp_path / "enc"
    shutil.copytree(encoder_dir, out)  # an encoder that states use
    (out / f"{export.STAGE_PREFIX}999999999").mkdir()  # the staging directory of an export that was killed
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    monkeypatch.setattr(export, "EXPORT_TOLERANCE", -1.0)  # the final check fails
    with pytest.raises(EncoderError, match="nothing was written"):
        export.export_encoder(out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no staging directory left either
    with pytest.raises(EncoderError, match="nothing was written"):
        export.export_encoder(tmp_path / "new" / "enc")  # an --out made for the export goes with it
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == []


def test_export_encoder_refuses_an_out_that_is_a_file_before_loading_the_model(tmp_path, capsys):
    """Found by a tester: `export-encoder --out FILE` loaded the model, then exited 2 with "[Errno 17] File exists"."""
    from client.device import device_cli

    (tmp_path / "enc").write_text("not a directory")
    assert device_cli.main(["export-encoder", "--out", str(tmp_path / "enc")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "give a directory" in err and "Loading" not in err


def test_a_choice_already_learned_is_recognised_whatever_its_key_order_or_extra_keys(tmp_path):
    """Found by a tester: the same choice with its keys in another order, with an extra key an app adds, or with its
    prompt as a one-message history was learned a second time (the README: adapt skips "the same prompt and
    responses"); next-question already counted such pairs as answered. The opposite answer is a new choice."""
    from client.device.device_cli import _not_yet_learned

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    first = {"prompt": "Which?", "chosen": "good", "rejected": "bad"}
    state = replace(new_state(tmp_path, load_basis(basis)), pair_diff=np.ones((2, 8), np.float32),
                    choices=(json.dumps(first), json.dumps({"precomputed": "a.npz#0"})))
    again = [{"rejected": "bad", "chosen": "good", "prompt": "Which?"},
             {**first, "source": "app v2"},
             {"history": [{"content": "Which?", "role": "user"}], "chosen": "good", "rejected": "bad"},
             {"prompt": "Which?", "chosen": "bad", "rejected": "good"},
             {"prompt": "Which one?", "chosen": "good", "rejected": "bad"}]
    fresh = _not_yet_learned(state, np.random.default_rng(1).standard_normal((len(again), 8)), again)
    assert fresh.tolist() == [False, False, False, True, True]


def test_a_choice_given_twice_in_one_file_is_learned_once(tmp_path):
    """A review: a choice repeated inside one --choices file was learned twice, while the same choice in a second
    run is skipped. Both now count it once, by the same rule (choice_identity for texts, the exact row for .npz)."""
    from client.device.device_cli import _not_yet_learned

    state_dir = _toy_state(tmp_path)
    rows = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    np.savez(tmp_path / "twice.npz", diff=rows[[0, 1, 0]])
    proc, _ = device(state_dir, "adapt", "--choices", tmp_path / "twice.npz")
    assert "skipped 1 of 3" in proc.stderr and "twice.npz" in proc.stderr and load_state(state_dir).n_pairs == 2
    choice = {"prompt": "Which?", "chosen": "good", "rejected": "bad"}
    texts = [choice, {"rejected": "bad", "chosen": "good", "prompt": "Which?", "source": "app"},
             {"prompt": "Which?", "chosen": "bad", "rejected": "good"}, choice]
    embedded = np.random.default_rng(5).standard_normal((3, 8))[[0, 0, 2, 0]]  # the same texts embed alike
    embedded[2] = -embedded[0]
    fresh = _not_yet_learned(load_state(state_dir), embedded, texts)
    assert fresh.tolist() == [True, False, True, False]  # the opposite answer is another choice
    other_words = [{"prompt": "Which?", "chosen": "Good ", "rejected": "bad"}]  # read as the same by the encoder
    assert not _not_yet_learned(load_state(state_dir), rows[[1]], other_words).any()  # a row already held


def test_text_that_is_not_unicode_is_refused_naming_the_file_and_field(tmp_path, capsys):
    """Found by a tester: a JSON "\\ud83d" escape (half an emoji) in a choice, a pool pair or a candidate exited 2
    with "cannot encode a pair within 256 tokens (TextInputSequence must be str)", naming no file; `rank --prompt`
    with a byte that is not UTF-8 ended in a TypeError traceback (exit 1)."""
    from client.device import device_cli
    from client.device.pool import read_pool

    (tmp_path / "c.jsonl").write_text('{"prompt": "q", "chosen": "yes \\ud83d", "rejected": "no"}\n')
    with pytest.raises(personalize.ChoicesError, match=r"c.jsonl: line 1: 'chosen' is not valid Unicode"):
        personalize.read_choices(tmp_path / "c.jsonl")
    (tmp_path / "h.jsonl").write_text('{"history": [{"role": "user", "content": "\\udc00"}], "chosen": "a", '
                                      '"rejected": "b"}\n')
    with pytest.raises(personalize.ChoicesError, match=r"'history\[0\].content' is not valid Unicode"):
        personalize.read_choices(tmp_path / "h.jsonl")
    (tmp_path / "p.jsonl").write_text('{"prompt": "q", "responses": ["a", "b \\ud83d"]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: line 1: .* is not valid Unicode"):
        read_pool(tmp_path / "p.jsonl", 8)
    (tmp_path / "c.json").write_text('["ok", "\\ud83d"]')
    with pytest.raises(ValueError, match=r"c.json: candidate 2 is not valid Unicode"):
        device_cli._read_candidates(tmp_path / "c.json")
    (tmp_path / "fine.jsonl").write_text('{"prompt": "q \\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n')
    assert personalize.read_choices(tmp_path / "fine.jsonl")[0]["prompt"] == "q \U0001f600"  # a whole emoji
    code = device_cli.main(["--state", str(tmp_path / "none"), "rank", "--prompt", "caf\udce9", "--candidates",
                            str(tmp_path / "c.json")])  # how Python passes the byte 0xe9 of a Latin-1 terminal
    assert code == 2 and "--prompt is not valid Unicode" in capsys.readouterr().err


def test_a_state_path_that_is_a_file_is_named_as_the_user_set_it(tmp_path, monkeypatch, capsys):
    """Found by a tester: with $LORE_DEVICE_HOME naming a file, `init` blamed "--state" (not given) and
    `forget --all` said the directory "does not exist"."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    (tmp_path / "home").write_text("a file")
    monkeypatch.setenv("LORE_DEVICE_HOME", str(tmp_path / "home"))
    assert device_cli.main(["init", "--basis", str(basis)]) == 2
    assert "$LORE_DEVICE_HOME" in capsys.readouterr().err
    assert device_cli.main(["forget", "--all"]) == 2
    assert "it is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "home").read_text() == "a file"


def test_forget_all_on_a_symlinked_state_keeps_the_link_and_says_so(tmp_path):
    """Found by a tester: `forget --all` on a state reached through a symbolic link deleted the files, then failed
    to rmdir the link ("[Errno 20] Not a directory", exit 2), or blamed a re-created lock file."""
    from client.device.state import forget

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    save_state(new_state(tmp_path / "link", load_basis(basis)))
    notes = forget(tmp_path / "link", everything=True).notes
    assert len(notes) == 1 and "symbolic link" in notes[0]
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "target").iterdir())


def test_a_save_never_deletes_a_users_file_that_merely_starts_like_a_state_file(tmp_path):
    """Found by a tester: every save deleted any file in the state directory whose name began with "basis-" or
    "personal-" (a copy of the basis kept there as basis-v2.npz) or began with "." and ended in ".tmp"."""
    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    state = save_state(new_state(state_dir, load_basis(basis)))
    mine = ["basis-v2.npz", "personal-notes.txt", ".notes.tmp"]
    stale = ["personal-0123456789abcdef.npz", ".personal-0123456789abcdef.npz.k3j9.tmp"]
    for name in mine + stale:
        (state_dir / name).write_text("x")
    save_state(replace(state, strength=0.5))
    left = {p.name for p in state_dir.iterdir()}
    assert set(mine) <= left and not set(stale) & left


def _toy_state(tmp_path) -> Path:
    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((3, 8)), version=1,
                       embedder="toy")
    state_dir = tmp_path / "state"
    save_state(new_state(state_dir, load_basis(basis)))
    return state_dir


def _state_with_choices(tmp_path) -> Path:
    state_dir = _toy_state(tmp_path)
    state = load_state(state_dir)
    save_state(replace(state, pair_diff=np.ones((2, 8), np.float32),
                       choices=tuple(json.dumps({"precomputed": f"c.npz#{i}"}) for i in range(2))))
    assert list(state_dir.glob("personal-*"))
    return state_dir


@pytest.mark.parametrize("field, value", [("pairs", "null"), ("generation", "Infinity"), ("pairs", "Infinity"),
                                          ("files", '["basis"]'), ("encoder_identity", '{"sha256": 5}')])
def test_forget_deletes_personal_data_whatever_the_manifest_holds(tmp_path, field, value):
    """A review found `forget` ending in a TypeError or OverflowError traceback, the personal file left on disk,
    when one manifest field was malformed: the deletion depended on the parser raising StateError."""
    from client.device.state import MANIFEST, forget

    state_dir = _state_with_choices(tmp_path)
    manifest = json.loads((state_dir / MANIFEST).read_text())
    manifest[field] = "@@"
    (state_dir / MANIFEST).write_text(json.dumps(manifest).replace('"@@"', value))
    notes = forget(state_dir).notes
    assert not list(state_dir.glob("personal-*")) and "deleted all the same" in notes[0]


@pytest.mark.parametrize("entry, field, text", [("basis", "bytes", "Infinity"), ("basis", "bytes", '"1000"'),
                                                ("", "generation", "-5"), ("", "generation", "1.5"),
                                                ("", "generation", "true"), ("", "pairs", "2.0")])
def test_a_manifest_count_that_is_not_a_json_integer_is_reported_as_corruption(tmp_path, capsys, entry, field, text):
    """Found by a tester: a manifest whose basis entry held `"bytes": Infinity` (which Python's json reads) ended
    every command in an OverflowError traceback, and a generation of -5, 1.5 or true was taken as a state's."""
    from client.device import device_cli
    from client.device.state import MANIFEST

    state_dir = _state_with_choices(tmp_path)
    manifest = json.loads((state_dir / MANIFEST).read_text())
    (manifest["files"][entry] if entry else manifest)[field] = "@@"
    (state_dir / MANIFEST).write_text(json.dumps(manifest).replace('"@@"', text))
    assert device_cli.main(["--state", str(state_dir), "status"]) == 2
    err = capsys.readouterr().err
    assert str(state_dir / MANIFEST) in err and f"{field} must be an integer" in err, err


def test_forget_deletes_personal_data_when_the_state_cannot_be_saved(tmp_path, monkeypatch):
    """A review: a full disk while `forget` rewrote the state left the personal file (exit 2, but data kept)."""
    import errno

    import client.device.state as state_module

    state_dir = _state_with_choices(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "save_state", disk_full)
    notes = state_module.forget(state_dir).notes
    assert not list(state_dir.glob("personal-*")) and "could not be saved" in notes[0]
    # A state that cannot be read (permission denied, say) is not called corrupted; its data goes all the same.
    state_dir = _state_with_choices(tmp_path / "again")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(state_dir / "manifest.json"))

    monkeypatch.setattr(state_module, "load_state", denied)
    notes = state_module.forget(state_dir).notes
    assert not list(state_dir.glob("personal-*")) and "could not be read" in notes[0]


def test_a_reader_whose_file_a_writer_deleted_reads_the_new_state(tmp_path, monkeypatch):
    """A review's stress run: 21 reads in 15,500 failed with '[Errno 2] ... personal-....npz' when a writer's commit
    deleted the old file between the reader's check and its read. The reader now tries again on the new manifest."""
    state_dir = _state_with_choices(tmp_path)
    read_bytes, raced = Path.read_bytes, []

    def a_writer_commits_first(path):
        if path.name.startswith("personal-") and not raced:
            raced.append(path.name)
            monkeypatch.setattr(Path, "read_bytes", read_bytes)  # the writer reads normally
            state = load_state(state_dir)
            save_state(replace(state, pair_diff=np.ones((3, 8), np.float32),  # deletes the file being read
                               choices=tuple(json.dumps({"precomputed": f"c.npz#{i}"}) for i in range(3))))
            monkeypatch.setattr(Path, "read_bytes", a_writer_commits_first)
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", a_writer_commits_first)
    state = load_state(state_dir)
    assert raced and state.n_pairs == 3


def test_forget_all_says_so_when_an_init_made_a_new_state_meanwhile(tmp_path, monkeypatch):
    """A review: an `init` that opened the lock file just after `forget --all` deleted it made a new state, and
    forget then named that state's files "not part of the device state" (and waited a second for nothing)."""
    from client.device.state import LOCK, forget, state_lock

    state_dir = _toy_state(tmp_path)
    basis = load_basis(tmp_path / "basis.npz")
    unlink, raced = Path.unlink, []

    def an_init_starts_now(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if path.name == LOCK and not raced:
            raced.append(True)
            with state_lock(state_dir, create=True):
                save_state(new_state(state_dir, basis))

    monkeypatch.setattr(Path, "unlink", an_init_starts_now)
    with state_lock(state_dir):
        notes = forget(state_dir, everything=True).notes
    assert raced and "making a new device state" in notes[0] and load_state(state_dir).n_pairs == 0


def test_a_lock_file_that_cannot_be_opened_is_named_not_retried_forever(tmp_path):
    """A review: `init` on a state whose `.lock` is a link to nowhere retried without end at 100 % CPU."""
    from client.device.state import LOCK, StateError, state_lock

    state_dir = _toy_state(tmp_path)
    (state_dir / LOCK).unlink(missing_ok=True)
    (state_dir / LOCK).symlink_to(tmp_path / "gone" / "lock")
    for create in (True, False):
        with pytest.raises(StateError, match="cannot be opened as the state's lock file"):
            with state_lock(state_dir, create=create):
                pass


def test_personal_data_without_marker_or_manifest_is_named_with_what_to_do(tmp_path):
    """A review: a state that lost both its marker and its manifest was refused as "not a device state" by forget and
    init alike, and the message said nothing of the personal data left in it."""
    from client.device.state import MANIFEST, MARKER, StateError, forget

    state_dir = _state_with_choices(tmp_path)
    (state_dir / MARKER).unlink()
    (state_dir / MANIFEST).unlink()
    with pytest.raises(StateError, match=r"holds personal data files \(personal-.*Delete those files by hand"):
        forget(state_dir)


def test_forget_all_names_what_it_kept_that_was_there_before(tmp_path):
    """A review: a user's entry with a state-like name that is not a regular file (a broken link) stayed, and
    forget --all said an `init` was making a new state."""
    from client.device.state import forget, state_lock

    state_dir = _toy_state(tmp_path)
    (state_dir / "personal-0123456789abcdef.npz").symlink_to(tmp_path / "nowhere")
    with state_lock(state_dir):
        notes = forget(state_dir, everything=True).notes
    assert "kept the directory" in notes[0] and "personal-0123456789abcdef.npz" in notes[0]


def test_forget_all_removes_what_a_killed_init_left_and_nothing_else(tmp_path, capsys):
    """A tester killed `init` at its first write: its lock and temp file stayed, and `forget --all` refused them
    ("remove the directory"). A directory with any other file is still refused, and left as it was."""
    from client.device import device_cli
    from client.device.state import LOCK

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / LOCK).touch()
    (state_dir / "..lore-fed-device-state.abc123.tmp").write_bytes(b"")
    assert device_cli.main(["--state", str(state_dir), "forget", "--all"]) == 0
    assert not state_dir.exists() and "left by an interrupted `init`" in capsys.readouterr().err
    state_dir.mkdir()
    (state_dir / LOCK).touch()
    (state_dir / "notes.txt").write_text("mine")
    assert device_cli.main(["--state", str(state_dir), "forget", "--all"]) == 2
    assert sorted(path.name for path in state_dir.iterdir()) == [LOCK, "notes.txt"]
    capsys.readouterr()
    assert device_cli.main(["--state", str(state_dir / "notes.txt"), "status"]) == 2  # was told to run init
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_command_that_waited_on_a_deleted_lock_file_locks_the_current_one(tmp_path):
    """A review found two commands holding the state lock at once: `forget --all` deleted `.lock` while a command
    waited on it; that command woke holding the deleted file, and the next one created and locked a new one."""
    import fcntl
    import threading

    from client.device.state import LOCK, state_lock

    state_dir = _toy_state(tmp_path)
    holder = open(state_dir / LOCK, "a+b")  # `forget --all` (or any command) in its locked section
    fcntl.flock(holder, fcntl.LOCK_EX)
    entered, release = threading.Event(), threading.Event()

    def waiting_command():
        with state_lock(state_dir):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=waiting_command)
    thread.start()
    try:
        assert not entered.wait(0.3)  # it waits on the holder's file
        (state_dir / LOCK).unlink()  # the holder deletes the lock file it holds, then ends
        holder.close()
        assert entered.wait(10)
        third = open(state_dir / LOCK, "a+b")
        with pytest.raises(BlockingIOError):  # the waiting command holds the path's current lock file
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        third.close()
    finally:
        release.set()
        thread.join(10)


def test_a_command_that_locked_a_state_being_deleted_changes_nothing_and_leaves_no_lock(tmp_path, monkeypatch):
    """A review found `adapt` committing inside `forget --all`: forget deleted `.lock` among the other files, and a
    command that had checked the state before its marker went created a new lock file and locked it at once. Now
    forget deletes the lock file last, and such a command finds no state under its lock, removes its lock file
    and stops, so forget still removes the directory."""
    import client.device.state as state_module
    from client.device.state import LOCK, StateError, forget, state_lock

    state_dir = _toy_state(tmp_path)
    unlink, require_state, raced = Path.unlink, state_module.require_state, {}

    def a_command_opens_the_lock_now(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if path.name == LOCK and not raced:
            raced["started"] = True
            monkeypatch.setattr(state_module, "require_state", Path)  # it checked the state before the marker went
            try:
                with state_lock(state_dir):
                    raced["ran"] = True
            except StateError as exc:
                raced["error"] = str(exc)
            monkeypatch.setattr(state_module, "require_state", require_state)

    monkeypatch.setattr(Path, "unlink", a_command_opens_the_lock_now)
    with state_lock(state_dir):  # as `forget --all` runs
        notes = forget(state_dir, everything=True).notes
    assert raced["started"] and "ran" not in raced and "deleted while" in raced["error"]
    assert notes == [] and not state_dir.exists()


def test_basis_file_checks(tmp_path):
    path = save_basis(tmp_path / "b.npz", np.ones((2, 3)), version=1, embedder="e")
    loaded = load_basis(path)
    assert loaded.basis.dtype == np.float32 and (loaded.rank, loaded.dim, loaded.version) == (2, 3, 1)
    with pytest.raises(BasisFileError, match="NaN"):
        save_basis(tmp_path / "bad.npz", np.full((2, 3), np.nan), version=1, embedder="e")
    arrays = dict(np.load(path))
    arrays["basis"] = arrays["basis"] * 2
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(BasisFileError, match="tampered.npz.*checksum"):
        load_basis(tmp_path / "tampered.npz")
    (tmp_path / "torn.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(BasisFileError, match="torn.npz"):
        load_basis(tmp_path / "torn.npz")


def test_device_adapts_with_the_personal_prior_of_its_basis_file(tmp_path):
    """The prior chosen with the basis (`prior_pairs` in basis.npz) is the one the device adapts with: a strong
    prior keeps w near the population, a weak one lets the same choices move it far."""
    rng = np.random.default_rng(3)
    basis = rng.standard_normal((3, 16))
    diff = (rng.standard_normal((6, 16)) + 2.0 * basis[0]).astype(np.float32)  # choices that favour basis row 0
    np.savez(tmp_path / "diff.npz", diff=diff)
    moved = {}
    for prior in (1.0, 30.0):
        state_dir = tmp_path / f"state{prior:g}"
        device(state_dir, "init", "--basis", save_basis(tmp_path / f"b{prior:g}.npz", basis, version=1, embedder="e",
                                                        prior_pairs=prior))
        device(state_dir, "adapt", "--choices", tmp_path / "diff.npz")
        state = load_state(state_dir)
        assert state.basis.prior_pairs == prior  # kept in the device's own copy of the basis
        moved[prior] = float(np.abs(state.user_weights - 1 / 3).sum())
        expected = personalize.adapt(basis.astype(np.float32), diff, prior_pairs=prior).user_weights
        np.testing.assert_allclose(state.user_weights, expected, atol=1e-6)
    assert moved[1.0] > 3 * moved[30.0]


def test_a_state_on_an_unnamed_basis_keeps_its_choices_when_the_next_basis_names_its_embedder(tmp_path, reference):
    """Bases written before pair files named their embedder say "unknown"; a device on one adopting a named basis
    of the same dimension keeps its stored choices (they are embeddings of that space), and a named embedder of
    another name still counts as another space."""
    rng = np.random.default_rng(4)
    unnamed = save_basis(tmp_path / "old.npz", rng.standard_normal((5, 384)), version=1, embedder="unknown")
    state_dir = _adapted_state(tmp_path, unnamed)  # 8 precomputed pairs, no texts: they cannot be re-embedded
    named = save_basis(tmp_path / "new.npz", rng.standard_normal((5, 384)), version=2, embedder=reference.name)
    proc, _ = device(state_dir, "init", "--basis", named, "--reinit")
    assert "did not name its embedder" in proc.stderr and load_state(state_dir).n_pairs == 8
    # a tester: the same model in another folder (another label, the same fingerprint) is the same space
    copied = save_basis(tmp_path / "copied.npz", rng.standard_normal((5, 384)), version=3,
                        embedder="my-copy" + reference.name[reference.name.index("@"):])
    device(state_dir, "init", "--basis", copied, "--reinit")
    assert load_state(state_dir).n_pairs == 8 and load_state(state_dir).basis.embedder.startswith("my-copy@")
    for embedder in ("another-model", "unknown"):  # a named space is left only by re-embedding, even for "unknown"
        other = save_basis(tmp_path / f"{embedder}.npz", rng.standard_normal((5, 384)), version=3, embedder=embedder)
        proc, _ = device(state_dir, "init", "--basis", other, "--reinit", check=False)
        assert proc.returncode == 2 and "another embedder" in proc.stderr and load_state(state_dir).n_pairs == 8


def test_an_encoder_of_another_model_than_the_basis_is_refused_by_init_and_by_a_command(tmp_path):
    """Carried from a review: `init --basis A_BASIS --encoder DIR_OF_MODEL_B` only printed a note, so a state kept
    model A's stored choices and basis and embedded every new choice and candidate with model B. A model copied to
    another folder (same files, another label) is the same model."""
    from lore_core.basis_file import other_embedders

    basis = save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="model-a")
    state_dir = tmp_path / "state"
    device(state_dir, "init", "--basis", basis, "--encoder", _fake_encoder_dir(tmp_path / "a", embedder="model-a"))
    stored = json.dumps({"prompt": "Which?", "chosen": "this", "rejected": "that"})
    save_state(replace(load_state(state_dir), pair_diff=np.ones((1, 8), np.float32), choices=(stored,)))
    other = _fake_encoder_dir(tmp_path / "b", model=b"model b", embedder="model-b")
    candidates = tmp_path / "answers.txt"
    candidates.write_text("Yes.\nNo.\n")
    before = {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"}
    for args in [("init", "--basis", basis, "--encoder", other),
                 ("rank", "--prompt", "Which?", "--candidates", candidates, "--encoder", other)]:
        proc, _ = device(state_dir, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "the encoder there is 'model-b'" in proc.stderr and "embeddings of 'model-a'" in proc.stderr
    assert {p.name: p.read_bytes() for p in state_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert not other_embedders("copy@0123456789/segment-pair/mean/l2", "model@0123456789/segment-pair/mean/l2")
    assert other_embedders("model@0123456789/segment-pair/mean/l2", "model@9876543210/segment-pair/mean/l2")
    # a folder whose name holds '@' (a tester's `tiny@v2`) is a label like any other, not part of the fingerprint
    assert not other_embedders("tiny@v2@0123456789/segment-pair/mean/l2", "tiny@0123456789/segment-pair/mean/l2")
    assert other_embedders("tiny@v2@0123456789/segment-pair/mean/l2", "tiny@0123456789/reward-model/last-token")
    assert not other_embedders("unknown", "model-b") and not other_embedders(None, "model-b")


# --- 6. a tester's findings: memory, repeated questions, strength off, what save_state commits --------------------


class _FakeEncoder:
    """Embeds any text as a seeded random 8-d vector: enough for commands on the 3 x 8 toy basis."""

    def embed(self, contexts, responses):
        return np.random.default_rng(len(responses)).standard_normal((len(responses), 8))


def test_the_preference_matrix_is_unchanged_and_its_memory_does_not_grow_with_candidates_squared_times_samples(
        monkeypatch):
    """Found by a tester: `rank` held all N^2 x S pairwise logits at once (372 MB at 100 candidates, 4.5 GB at 600).
    The matrix is now computed a block of rows at a time, to the same values."""
    import tracemalloc

    from client.device.posterior import PosteriorSamples, preference_probability

    rng = np.random.default_rng(0)
    basis, embeddings = rng.standard_normal((5, 16)), rng.standard_normal((200, 16))
    samples = PosteriorSamples(w=rng.dirichlet(np.ones(5), size=(1, 512)), probability=np.full((1, 512), 1 / 512))
    scores = embeddings[:7] @ basis.T
    all_at_once = preference_probability(samples, (scores[:, None] - scores[None]).reshape(1, -1, 5))[0]
    with monkeypatch.context() as blocks:
        blocks.setattr(ranking, "_BLOCK_VALUES", 3 * 7 * 512)  # blocks of 3, 3 and 1 rows
        in_blocks = ranking.preference_matrix(basis, samples, embeddings[:7])
    np.testing.assert_array_equal(in_blocks, all_at_once.reshape(7, 7))
    tracemalloc.start()
    try:
        ranking.preference_matrix(basis, samples, embeddings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"  # all at once: 200^2 x 512 logits, 164 MB an array
    assert ranking.preference_matrix(basis, samples, embeddings[:0]).shape == (0, 0)  # no candidates (a reviewer)


def test_rank_computes_the_pairwise_matrix_only_when_it_prints_it(tmp_path, monkeypatch, capsys):
    """Found by a tester: `rank` without --json computed the (N, N) preference matrix it never prints."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    candidates = tmp_path / "answers.txt"
    candidates.write_text("Save.\nSpend.\nInvest.\n")
    monkeypatch.setattr(device_cli, "_open_encoder", lambda *args, **kwargs: _FakeEncoder())
    computed = []
    real = ranking.preference_matrix
    monkeypatch.setattr(ranking, "preference_matrix", lambda *args: computed.append(1) or real(*args))
    rank = ["--state", str(state_dir), "rank", "--prompt", "Money?", "--candidates", str(candidates)]
    assert device_cli.main(rank) == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert computed == []
    assert device_cli.main(rank + ["--json"]) == 0
    assert computed == [1] and np.shape(json.loads(capsys.readouterr().out)["preference_probability"]) == (3, 3)


def test_answered_pool_pairs_are_found_in_memory_linear_in_the_pool_and_the_answers():
    """Found by a tester: `next-question` compared every .npz pool row with every answer in a (pool, answers, D)
    array (53.6 GiB for 50,000 x 3,000 x 384). Rows are hashed now; answers either way round still count."""
    import tracemalloc

    from client.device.pool import Pool, answered

    diff = np.random.default_rng(0).standard_normal((5000, 64))
    diff[300, :3] = 0.0  # answered the other way round: its -0.0 values are the pool's 0.0
    stored = np.r_[diff[:250], -diff[250:500]].astype(np.float32)
    tracemalloc.start()
    try:
        done = answered(Pool(records=None, diff=diff), (), stored)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done[:500].all() and not done[500:].any()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB"  # all against all: 5,000 x 500 x 64, 160 MB a comparison


def test_a_batch_never_asks_a_pair_twice_when_the_pool_repeats_it_either_way_round(tmp_path, monkeypatch, capsys):
    """Found by a tester: `next-question --k` asked the same question twice from a pool holding it twice (the same
    pair, or its responses swapped: a row and its negation, a text pair with A and B exchanged). A question is
    unordered; a repeat is asked once, at its first index."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    first, other = np.random.default_rng(0).standard_normal((2, 8))
    # and zero rows (responses that embed alike, or differ by 1e-30), which `adapt` refuses: never asked (a tester
    # got one at 0 bits)
    np.savez(tmp_path / "pool.npz", diff=np.stack([first, -first, other, first, np.zeros(8), np.full(8, 1e-30)]))
    text = [{"prompt": "Money?", "responses": pair} for pair in (["Save.", "Spend."], ["Spend.", "Save."],
                                                                  ["Save.", "Invest."])]
    (tmp_path / "pool.jsonl").write_text("\n".join(map(json.dumps, text)))
    monkeypatch.setattr(device_cli, "_open_encoder", lambda *args, **kwargs: _FakeEncoder())
    for pool in ("pool.npz", "pool.jsonl"):
        ask = ["--state", str(state_dir), "next-question", "--candidates", str(tmp_path / pool), "--k", "3"]
        assert device_cli.main(ask) == 0
        out = json.loads(capsys.readouterr().out)
        assert sorted(q["index"] for q in out["questions"]) == [0, 2], pool
        assert out["unanswered"] == 2  # distinct askable questions, not pool rows


def test_next_question_under_strength_off_refuses_as_adapt_does(tmp_path, capsys):
    """Found by a tester: under `strength off` (no personalization, no learning) `next-question` kept asking
    questions whose answers `adapt` refuses. Both now refuse, saying how to turn learning on."""
    from client.device import device_cli

    state_dir = _toy_choices_and_state(tmp_path)
    np.savez(tmp_path / "pool.npz", diff=np.random.default_rng(2).standard_normal((5, 8)))
    assert device_cli.main(["--state", str(state_dir), "strength", "off"]) == 0
    capsys.readouterr()
    for command in (["next-question", "--candidates", str(tmp_path / "pool.npz")],
                    ["adapt", "--choices", str(tmp_path / "c.npz")]):
        assert device_cli.main(["--state", str(state_dir), *command]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "personalization is off" in err and "`strength 1`" in err, err


@pytest.mark.parametrize("change, says", [
    ({"user_weights": np.array([np.nan, 0.5, 0.5])}, "user_weights must be (3,) on the simplex"),
    ({"user_weights": np.array([2.0, -1.0, 0.0])}, "got [ 2. -1.  0.]"),
    ({"pair_diff": np.full((2, 8), np.nan, np.float32)}, "pair_diff must be finite (n, 8)"),
    ({"pair_diff": np.ones((2, 10), np.float32)}, "pair_diff must be finite (n, 8), got shape (2, 10)"),
    ({"choices": ()}, "2 pairs, 0 choices"),
    ({"strength": 5.0}, "strength must be in [0, 1] or 'off', got 5.0"),
    ({"choices": ("not json", "not json")}, "stored choice 1 is not JSON"),
])
def test_save_state_refuses_what_load_state_would_call_corrupted_and_writes_nothing(tmp_path, change, says):
    """Found by a tester: `save_state` committed NaN or off-simplex weights, NaN pairs, choices not aligned with the
    pairs, a strength of 5 or a choice that is not JSON, and the next `load_state` refused the state as corrupted.
    Both apply the same checks; a save refuses before it writes anything."""
    state_dir = _state_with_choices(tmp_path)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}
    with pytest.raises(ValueError) as refused:
        save_state(replace(load_state(state_dir), **change))
    assert "was not saved" in str(refused.value) and says in str(refused.value), refused.value
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before and load_state(state_dir).n_pairs == 2


def test_a_rank_1_basis_serves_every_command_with_w_fixed_at_one(tmp_path, capsys):
    """Found by a tester: a basis from `train --rank 1` (or `--rank auto`'s choice of it) passed `init`, then every
    other command failed with "zero-size array to reduction operation maximum" (the posterior's chart has no
    dimension at B = 1). The device now serves it: w = (1,) for sure, and next-question says nothing can be learned."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.random.default_rng(0).standard_normal((1, 8)), version=1,
                       embedder="toy")
    np.savez(tmp_path / "c.npz", diff=np.random.default_rng(1).standard_normal((4, 8)))
    np.savez(tmp_path / "pool.npz", diff=np.random.default_rng(2).standard_normal((6, 8)))
    state = ["--state", str(tmp_path / "state")]
    assert device_cli.main([*state, "init", "--basis", str(basis)]) == 0
    assert device_cli.main([*state, "adapt", "--choices", str(tmp_path / "c.npz")]) == 0
    capsys.readouterr()
    assert device_cli.main([*state, "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["answers"] == 4 and status["user_weights"] == [1.0] and status["spread"] == 0.0
    assert status["weights_interval_90"] == [[1.0, 1.0]]
    assert device_cli.main([*state, "next-question", "--candidates", str(tmp_path / "pool.npz")]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert asked["stop"] and "rank 1" in asked["reason"], asked


def test_a_damaged_file_of_the_states_own_encoder_is_refused_naming_it(tmp_path):
    """Found by a tester: the state's own encoder files were never verified after `init`, so a model.onnx partly
    overwritten later scored candidates with exit 0 (other scores), and a tokenizer.json that the tokenizers package
    cannot read gave a traceback. Every command that embeds verifies the checksums, and names the tokenizer file."""
    basis = save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="synthetic")
    enc = _fake_encoder_dir(tmp_path / "enc")
    state_dir = tmp_path / "state"
    device(state_dir, "init", "--basis", basis, "--encoder", enc)
    candidates = tmp_path / "answers.txt"
    candidates.write_text("Yes.\nNo.\n")
    rank = ("rank", "--prompt", "Which?", "--candidates", candidates)
    (enc / "model.onnx").write_bytes(b"not a mode!")  # the same size, other bytes
    proc, _ = device(state_dir, *rank, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{enc.resolve() / 'model.onnx'}: checksum mismatch" in proc.stderr, proc.stderr
    _fake_encoder_dir(enc, model=b"{not json")  # checksums that hold over files no package can read
    device(state_dir, "init", "--basis", basis, "--encoder", enc)
    proc, _ = device(state_dir, *rank, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{enc.resolve() / 'tokenizer.json'}: the tokenizers package cannot read it" in proc.stderr, proc.stderr


@pytest.mark.parametrize("content, says", [
    ('{"candidates": ["Budget.", "Lottery."]}', "got JSON objects"),
    ('{"prompt": "Which?", "chosen": "a", "rejected": "b"}\n{"prompt": "Which?", "chosen": "c", "rejected": "d"}\n',
     "got JSON objects"),
    ('{\n  "candidates": ["Budget.", "Lottery."]\n}\n', "got JSON objects"),
    ('["", "  ", "ok"]', "candidates [1, 2] are blank"),
    (None, "a zip archive such as an .npz")])
def test_rank_refuses_candidates_that_are_json_objects_or_blank_naming_the_file(tmp_path, capsys, content, says):
    """Found by a tester: a JSON object or a JSONL file of choices was ranked as its raw text (exit 0), and a JSON
    list's blank strings were ranked while a text file's blank lines are dropped; an .npz read "not valid UTF-8"."""
    from client.device import device_cli

    state_dir = _toy_choices_and_state(tmp_path)
    candidates = tmp_path / "candidates.json"
    if content is None:
        np.savez(candidates.with_suffix(".npz"), diff=np.ones((2, 3)))
        candidates.with_suffix(".npz").replace(candidates)
    else:
        candidates.write_text(content)
    assert device_cli.main(["--state", str(state_dir), "rank", "--prompt", "Which?", "--candidates",
                            str(candidates)]) == 2
    err = capsys.readouterr().err
    assert f"{candidates}: " in err and says in err, err
    assert device_cli.main(["--state", str(state_dir), "rank", "--prompt", " ", "--candidates", str(candidates)]) == 2
    assert "--prompt is blank" in capsys.readouterr().err


def test_init_notes_that_a_basis_naming_no_embedder_cannot_be_checked_against_its_encoder(tmp_path):
    """Found by a tester: a basis trained on a pair file that names no embedder (synthetic, or older) was paired
    with the MiniLM encoder without a word, and its scores meant nothing. `init --encoder` says so (exit 0)."""
    unnamed = save_basis(tmp_path / "unnamed.npz", np.eye(2, 8), version=1, embedder="unknown")
    named = save_basis(tmp_path / "named.npz", np.eye(2, 8), version=1, embedder="synthetic")
    enc = _fake_encoder_dir(tmp_path / "enc")
    proc, _ = device(tmp_path / "a", "init", "--basis", unnamed, "--encoder", enc)
    assert f"note: basis {unnamed} does not name the embedder it was trained on" in proc.stderr, proc.stderr
    proc, _ = device(tmp_path / "b", "init", "--basis", named, "--encoder", enc)
    assert "does not name" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_init_reinit_after_a_damaged_basis_file_keeps_the_intact_choices(tmp_path, capsys, damage):
    """Found by a tester: with only the state's basis file lost, `init --reinit --basis FILE` said "starting afresh"
    and dropped the 5 choices its intact personal file held. They are kept, and w refitted from them; a damaged
    personal file still starts afresh, saying that nothing was kept."""
    from client.device import device_cli

    state_dir = _toy_choices_and_state(tmp_path)
    state = ["--state", str(state_dir)]
    assert device_cli.main([*state, "adapt", "--choices", str(tmp_path / "c.npz")]) == 0
    before = load_state(state_dir)
    stored = next(state_dir.glob("basis-*.npz"))
    if damage == "missing":
        stored.unlink()
    else:
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    with pytest.raises(StateCorruptError):
        load_state(state_dir)
    capsys.readouterr()
    assert device_cli.main([*state, "init", "--basis", str(tmp_path / "basis.npz"), "--reinit"]) == 0
    assert "keeping its 4 stored choices" in capsys.readouterr().out
    after = load_state(state_dir)
    assert after.choices == before.choices and np.array_equal(after.pair_diff, before.pair_diff)
    np.testing.assert_allclose(after.user_weights, before.user_weights, atol=1e-6)  # the same basis: the same w
    assert device_cli.main([*state, "strength", "0.5"]) == 0
    personal = next(state_dir.glob("personal-*.npz"))
    personal.write_bytes(personal.read_bytes()[:-100])
    assert device_cli.main([*state, "init", "--basis", str(tmp_path / "basis.npz"), "--reinit"]) == 0
    assert "with its settings (strength, encoder); its stored choices could not be kept" in capsys.readouterr().out
    assert load_state(state_dir).n_pairs == 0 and load_state(state_dir).strength == 0.5  # a tester's went to 1


def test_the_state_directory_is_private_and_lore_device_home_is_read_as_a_user_means_it(tmp_path, monkeypatch,
                                                                                         capsys):
    """Found by a tester: the state directory was created 755 (its files 600), a quoted "~/..." in
    $LORE_DEVICE_HOME made a directory named "~", and a blank value was used as a path."""
    from client.device import device_cli

    basis = save_basis(tmp_path / "basis.npz", np.eye(2, 8), version=1, embedder="toy")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORE_DEVICE_HOME", "~/states/mine")
    assert device_cli.main(["init", "--basis", str(basis)]) == 0
    made = tmp_path / "home" / "states" / "mine"
    assert load_state(made).n_pairs == 0 and not (tmp_path / "~").exists()
    assert made.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("LORE_DEVICE_HOME", "  ")
    assert device_cli.main(["status"]) == 2
    assert "$LORE_DEVICE_HOME is blank" in capsys.readouterr().err


def test_a_manifest_that_lost_its_personal_entry_is_corrupted_not_a_cold_start(tmp_path):
    """Found by a tester: a manifest with its personal entry removed (its "pairs": 4 kept) loaded as a cold start,
    and the next `adapt` deleted the personal file as unreferenced: the user's choices were lost without a word."""
    from client.device import device_cli

    state_dir = _toy_choices_and_state(tmp_path)
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "c.npz")]) == 0
    manifest = json.loads((state_dir / "manifest.json").read_text())
    del manifest["files"]["personal"]
    (state_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StateCorruptError, match="declares 4 pairs but names no personal file"):
        load_state(state_dir)
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "c.npz")]) == 2
    assert next(state_dir.glob("personal-*.npz")).is_file()


def test_reinit_keeps_no_choices_whose_embedding_space_the_damaged_state_does_not_vouch_for(tmp_path, capsys):
    """A reviewer: the salvage trusted the damaged manifest's embedder, so one naming the new basis' model while the
    intact stored basis was another model's kept that model's pairs under the new basis. Both must agree with it;
    the declared pair count must hold too."""
    from client.device import device_cli

    state_dir = _toy_choices_and_state(tmp_path)
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "c.npz")]) == 0
    other = save_basis(tmp_path / "other.npz", np.random.default_rng(5).standard_normal((3, 8)), version=1,
                       embedder="other")
    manifest = json.loads((state_dir / "manifest.json").read_text())
    for damaged in ({**manifest, "embedder": "other"}, {**manifest, "pairs": 99}):
        (state_dir / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(StateCorruptError):
            load_state(state_dir)
        from client.device.state import salvage_choices

        assert salvage_choices(state_dir, load_basis(other if damaged["embedder"] == "other" else
                                                     tmp_path / "basis.npz")) is None
    (state_dir / "manifest.json").write_text(json.dumps({**manifest, "embedder": "other"}))
    capsys.readouterr()
    assert device_cli.main(["--state", str(state_dir), "init", "--basis", str(other), "--reinit"]) == 0
    assert "could not be kept" in capsys.readouterr().out and load_state(state_dir).n_pairs == 0


def test_stored_choices_take_their_own_length_not_the_longest_s_and_older_states_still_load(tmp_path):
    """A tester: 7 choices, one of 5 MB, made a 140 MB personal file (a (n,) str array pads every choice to the
    longest), and each later choice added 20 MB. Choices are now UTF-8 JSON lines; a state written before still
    loads."""
    from client.device.state import _choices_array, _choices_of

    state_dir = _toy_state(tmp_path)
    long = json.dumps({"prompt": "q", "chosen": "word " * 30_000, "rejected": "no"})  # 150,000 characters
    short = tuple(json.dumps({"prompt": f"q{i}", "chosen": "a\u2028b", "rejected": "c"}) for i in range(6))
    save_state(replace(load_state(state_dir), pair_diff=np.ones((7, 8), np.float32), choices=(long, *short)))
    personal = next(state_dir.glob("personal-*.npz"))
    assert personal.stat().st_size < 200_000  # padded: 7 x 150,000 x 4 bytes = 4.2 MB
    assert load_state(state_dir).choices == (long, *short)
    assert _choices_of(np.array([long, *short])) == (long, *short) == _choices_of(_choices_array((long, *short)))
    assert _choices_of(_choices_array(())) == ()
    spread = '{"prompt": "q",\n "chosen": "a", "rejected": "b"}'  # another tool's JSON over two lines
    assert _choices_of(_choices_array((spread,))) == ('{"prompt": "q", "chosen": "a", "rejected": "b"}',)


@pytest.mark.parametrize("record, says", [
    ({"prompt": "q", "chosen": "word " * 50_000, "rejected": "no"}, "a choice holds at most 200,000"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "extra": float("nan")}, "NaN or infinite"),
    ({"prompt": "q", "chosen": "\u200b", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "\ufeff \u200b", "chosen": "a", "rejected": "b"}, "the prompt is blank"),
])
def test_a_choice_too_long_not_strict_json_or_invisible_is_refused(tmp_path, record, says):
    """A tester: a 5 MB choice was stored whole, an extra key NaN was stored as non-JSON, and a response of U+200B
    passed as text."""
    (tmp_path / "c.jsonl").write_text(json.dumps(record))
    with pytest.raises(personalize.ChoicesError, match=says):
        personalize.read_choices(tmp_path / "c.jsonl")


def test_text_choices_the_encoder_reads_as_one_text_are_refused(tmp_path, monkeypatch):
    """A tester: {"chosen": "Hello", "rejected": "hello "} was learned, with a pair difference of exactly 0 (an
    .npz row of zeros is refused)."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "Hello", "rejected": "hello "}]
    (tmp_path / "c.jsonl").write_text("\n".join(map(json.dumps, records)))
    monkeypatch.setattr(device_cli, "_open_encoder", lambda state, directory: None)
    monkeypatch.setattr(device_cli, "embed_choices", lambda encoder, texts: np.vstack([np.ones(8), np.zeros(8)]))
    with pytest.raises(personalize.ChoicesError, match=r"c.jsonl: choices \[2\] compare responses the encoder reads"):
        device_cli._choice_diffs(tmp_path / "c.jsonl", load_state(state_dir), None)


def test_an_npz_of_another_user_is_refused_as_a_text_file_of_one_is(tmp_path, capsys):
    """A tester: after text choices of user u1, an .npz whose `user` array names u2 was learned (exit 0)."""
    from client.device import device_cli

    state_dir = _toy_state(tmp_path)
    stored = json.dumps({"user": "u\x1b[2J1", "prompt": "q", "chosen": "a", "rejected": "b"})
    save_state(replace(load_state(state_dir), pair_diff=np.ones((1, 8), np.float32), choices=(stored,)))
    rows = np.random.default_rng(2).standard_normal((2, 8))
    np.savez(tmp_path / "d.npz", diff=rows, user=np.array(["u2", "u2"]))
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "choices of user u2, but the device state holds choices of user u\\x1b[2J1" in err and "\x1b" not in err
    assert load_state(state_dir).n_pairs == 1
    # Ids that are not strings slipped past the check (a tester's user=[7, 7] joined u1's state, exit 0), and so
    # did one id for several rows.
    for user, says in ((np.array([7, 7]), "user must be a 1-D array of strings"),
                       (np.array([b"u2", b"u2"]), "user must be a 1-D array of strings"),
                       (np.array(["u\x1b[2J1"]), "user has 1 ids for 2 diff rows"),
                       (np.array([], dtype=str), "user has 0 ids for 2 diff rows")):
        np.savez(tmp_path / "d.npz", diff=rows, user=user)
        assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "d.npz")]) == 2
        assert says in capsys.readouterr().err
    assert load_state(state_dir).n_pairs == 1
    np.savez(tmp_path / "d.npz", diff=rows, user=np.array(["u\x1b[2J1"] * 2))
    assert device_cli.main(["--state", str(state_dir), "adapt", "--choices", str(tmp_path / "d.npz")]) == 0
    assert load_state(state_dir).n_pairs == 3


def test_rank_reads_one_candidate_per_line_whatever_else_the_line_holds(tmp_path):
    """A tester: str.splitlines cut candidates at U+2028, form feeds, U+0085 and a lone CR, so 4 lines gave 7
    candidates whose indices no longer matched the app's lines."""
    from client.device.device_cli import _read_candidates
    from lore_core.text_file import shown

    path = tmp_path / "c.txt"
    path.write_bytes("first\u2028second\nalpha\x0cbeta\r\ngamma\x85delta\nplain\rtext\n\n".encode())
    assert _read_candidates(path) == ["first\u2028second", "alpha\x0cbeta", "gamma\x85delta", "plain\rtext"]
    assert shown("a\x1b[2Jb\u202ec\td\x85") == "a\\x1b[2Jb\\u202ec\td\\x85"  # what the plain ranking prints


def test_an_edited_encoder_json_is_refused_not_used(tmp_path, encoder_dir):
    """A tester: max_context_tokens 0 (or another window) in a copy's encoder.json changed every score without a
    word, as only the model and tokenizer are checksummed; so did an unknown pair_mode."""
    import shutil

    from client.device.encoder import EncoderError

    edited = tmp_path / "enc"
    shutil.copytree(encoder_dir, edited)
    meta = json.loads((encoder_dir / "encoder.json").read_text())
    for change, says in (({"max_context_tokens": 0}, "the file was edited"),
                         ({"max_length": 64, "max_context_tokens": 32}, "the file was edited"),
                         ({"pair_mode": "x"}, "pair_mode must be 'segment'"),
                         ({"inputs": ["input_ids"]}, "pair_mode must be 'segment'")):
        (edited / "encoder.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(EncoderError, match=says):
            OnnxPairEncoder(edited)
    (edited / "encoder.json").write_text(json.dumps(meta))
    assert OnnxPairEncoder(edited).max_context_tokens == meta["max_context_tokens"]


def test_init_names_what_differs_in_another_basis(tmp_path):
    """A tester: the same basis under another embedder name read "version 0 (5ffe658ee97b) differs from the state's
    version 0 (5ffe658ee97b)"."""
    from client.device.state import BasisMismatchError, check_compatible

    matrix = np.random.default_rng(0).standard_normal((3, 8))
    state = new_state(tmp_path / "s", load_basis(save_basis(tmp_path / "a.npz", matrix, version=0, embedder="e1")))
    other = load_basis(save_basis(tmp_path / "b.npz", matrix, version=0, embedder="e2"))
    with pytest.raises(BasisMismatchError, match=r"another basis \(embedder 'e2', the state's 'e1'\); use `init"):
        check_compatible(state, other)


def test_a_state_of_format_1_loads_and_is_written_again_in_format_2_lone_surrogates_included(tmp_path, monkeypatch):
    """The personal file's choices became UTF-8 JSON lines (format /2): a /1 state (a padded (n,) str array) still
    loads and is written again as /2. A reviewer: a stored choice with a lone surrogate (an .npz file name that is not
    UTF-8, kept by an earlier `adapt`) made every later save fail; it is now written escaped."""
    from client.device import state as state_module

    state_dir = _toy_state(tmp_path)
    choices = (json.dumps({"precomputed": "caf\udce9.npz#0"}, ensure_ascii=False),
               json.dumps({"prompt": "q", "chosen": "a\u2028b", "rejected": "c"}, ensure_ascii=False))
    with monkeypatch.context() as patch:  # what lore-fed 0.2.3 wrote
        patch.setattr(state_module, "STATE_FORMAT", "lore-fed-device-state/1")
        patch.setattr(state_module, "_choices_array", lambda texts: np.array(texts, dtype=np.str_).reshape(-1))
        save_state(replace(load_state(state_dir), pair_diff=np.ones((2, 8), np.float32), choices=choices))
    assert json.loads((state_dir / "manifest.json").read_text())["format"] == "lore-fed-device-state/1"
    old = load_state(state_dir)
    assert old.choices == choices
    save_state(replace(old, strength=0.5))
    assert json.loads((state_dir / "manifest.json").read_text())["format"] == "lore-fed-device-state/2"
    assert [json.loads(text) for text in load_state(state_dir).choices] == [json.loads(text) for text in choices]
    (tmp_path / "c.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "user": "\\ud83d"}')
    with pytest.raises(personalize.ChoicesError, match="a key or value is not valid Unicode"):
        personalize.read_choices(tmp_path / "c.jsonl")


def test_init_refuses_an_all_zero_basis_and_leaves_an_existing_state_as_it_was(tmp_path, basis_file):
    """A tester: a basis of zeros was taken, though it gives every response the same reward (every question then
    teaches 0 bits)."""
    zero = save_basis(tmp_path / "zero.npz", np.zeros((4, 384)), version=9, embedder=load_basis(basis_file).embedder)
    proc, _ = device(tmp_path / "new", "init", "--basis", zero, check=False)
    assert proc.returncode == 2 and "zero.npz: every entry of the basis is 0" in proc.stderr
    assert not (tmp_path / "new").exists()
    state_dir = _adapted_state(tmp_path, basis_file)
    before = load_state(state_dir)
    proc, _ = device(state_dir, "init", "--basis", zero, "--reinit", check=False)
    assert proc.returncode == 2 and "every entry of the basis is 0" in proc.stderr
    after = load_state(state_dir)
    assert after.basis.version == before.basis.version and after.n_pairs == before.n_pairs
