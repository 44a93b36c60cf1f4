"""Pair embeddings: rendering, the real MiniLM, any local HF encoder, reward-model mode, the cache, `lore-fed embed`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lore_core.embeddings import (  # noqa: E402
    CacheCorruptionWarning,
    EmbeddingCache,
    EmbeddingError,
    RewardModelEmbedder,
    SentenceEmbedder,
    load_embedder,
    pair_keys,
    render_context,
    resolve_model_dir,
    trim_context_left,
)
from lore_core.pairs import load_pairs, file_digest  # noqa: E402
from lore_cli.main import main as cli_main  # noqa: E402

HISTORY = [
    {"role": "user", "content": "How can I save money on groceries?"},
    {"role": "assistant", "content": "Plan meals and compare unit prices."},
    {"role": "user", "content": "Which store brands are good?"},
]
CHOSEN = "Most supermarket own-brands match name brands for staples like flour, rice and canned tomatoes."
REJECTED = "It depends on where you live."


@pytest.fixture(scope="module")
def minilm():
    """The offline all-MiniLM-L6-v2, loaded once; tests that cache attach their own EmbeddingCache."""
    return load_embedder(use_cache=False)


@pytest.fixture
def cached_minilm(minilm, tmp_path):
    minilm.cache = EmbeddingCache(tmp_path / "cache", minilm.name, minilm.dim)
    yield minilm
    minilm.cache = None


def reference_pair_embedding(embedder, context: str, response: str | None) -> np.ndarray:
    """The documented recipe written out with plain transformers (segment pair, or the response alone)."""
    tok, model = embedder.tokenizer, embedder.model
    args = (context, response) if response is not None else (context,)
    batch = tok(*args, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy()


# ---------------------------------------------------------------------------------------------------- rendering


def test_render_context_format():
    assert render_context(HISTORY) == (
        "user: How can I save money on groceries?\n"
        "assistant: Plan meals and compare unit prices.\n"
        "user: Which store brands are good?"
    )
    assert render_context([]) == ""
    assert render_context([{"role": "user", "content": "line 1\nline 2"}]) == "user: line 1\nline 2"


@pytest.mark.parametrize("bad", [[{"role": "model", "content": "x"}], [{"role": "user"}], "user: hi"])
def test_render_context_rejects_bad_messages(bad):
    with pytest.raises(EmbeddingError):
        render_context(bad)


def test_trim_context_left_keeps_the_end_at_a_word_boundary(minilm):
    context = "alpha " * 50 + "unbelievably tokenizable ending"
    offsets = minilm.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for budget in range(1, 12):
        kept = trim_context_left(context, offsets, budget)
        assert context.endswith(kept) and kept[:1].isalnum() and context[-len(kept) - 1] == " "
        assert len(minilm.tokenizer(kept, add_special_tokens=False)["input_ids"]) <= budget
    assert trim_context_left(context, offsets, len(offsets)) == context
    assert trim_context_left(context, offsets, 0) == ""  # a tester's max_context_tokens 0: an IndexError before


# ---------------------------------------------------------------------------------------------------- MiniLM


def test_minilm_embeddings_are_normalised_segment_pairs(minilm):
    contexts = [HISTORY, HISTORY, render_context(HISTORY), HISTORY[:1]]
    responses = [CHOSEN, REJECTED, CHOSEN, CHOSEN]
    emb = minilm.embed(contexts, responses, progress=False)

    assert emb.shape == (4, 384) and emb.dtype == np.float32 and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])  # message list and its rendering are the same input
    assert minilm.last_stats.unique == 3 and minilm.last_stats.computed == 3
    assert not np.allclose(emb[0], emb[3], atol=1e-3)  # the context matters

    context = render_context(HISTORY)
    np.testing.assert_allclose(emb[0], reference_pair_embedding(minilm, context, CHOSEN), atol=1e-5)
    response_only = reference_pair_embedding(minilm, CHOSEN, None)
    assert float(emb[0] @ response_only) < 0.99


def test_long_context_is_cut_from_the_left(minilm):
    history = [{"role": "user", "content": "tell me more about the weather " * 120 + "in Lisbon in May"}]
    emb = minilm.embed([history], [CHOSEN], progress=False)  # only_second alone would fail: context > 256 tokens

    context = render_context(history)
    offsets = minilm.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    kept = trim_context_left(context, offsets, minilm.max_context_tokens)
    assert kept.endswith("in Lisbon in May") and len(kept) < len(context)
    np.testing.assert_allclose(emb[0], reference_pair_embedding(minilm, kept, CHOSEN), atol=1e-5)


def test_a_context_beyond_the_window_is_cut_without_a_warning_of_indexing_errors():
    """Found by a tester: embed and synth printed transformers' "will result in indexing errors" for a long context,
    although the context is cut to fit before the model sees it. (The tokenizer records the warning it gave.)"""
    embedder = load_embedder(use_cache=False)  # a fresh tokenizer: it warns once per instance
    emb = embedder.embed([[{"role": "user", "content": "word " * 600}]], [CHOSEN], progress=False)
    warned = embedder.tokenizer.deprecation_warnings
    assert emb.shape == (1, 384) and not warned.get("sequence-length-is-longer-than-the-specified-maximum")


def test_embed_rejects_mismatched_inputs(minilm):
    with pytest.raises(EmbeddingError, match="2 contexts but 1 responses"):
        minilm.embed([HISTORY, HISTORY], [CHOSEN])
    with pytest.raises(EmbeddingError, match="message 0"):
        minilm.embed([[{"role": "system", "content": "x"}]], [CHOSEN])


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(EmbeddingError, match="no CUDA GPU is available"):
        load_embedder(device="cuda")


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_serves_a_rerun_without_model_calls(cached_minilm, tmp_path):
    contexts, responses = [HISTORY] * 3 + [HISTORY[:1]], [CHOSEN, REJECTED, CHOSEN, REJECTED]
    first = cached_minilm.embed(contexts, responses, progress=False)
    assert (cached_minilm.last_stats.computed, cached_minilm.last_stats.cached) == (3, 0)

    # A new cache object over the same directory behaves like a new process.
    cached_minilm.cache = EmbeddingCache(tmp_path / "cache", cached_minilm.name, cached_minilm.dim)
    calls_before = cached_minilm.total_computed
    again = cached_minilm.embed(contexts + [HISTORY], responses + ["A new answer."], progress=False)
    assert (cached_minilm.last_stats.computed, cached_minilm.last_stats.cached) == (1, 3)
    assert cached_minilm.total_computed == calls_before + 1
    np.testing.assert_array_equal(again[:4], first)


@pytest.mark.parametrize("damage", ["flip a vector byte", "truncate", "flip a key byte"])
def test_corrupted_cache_shard_is_detected_and_rebuilt(cached_minilm, tmp_path, damage):
    fresh = cached_minilm.embed([HISTORY, HISTORY], [CHOSEN, REJECTED], progress=False)
    (shard,) = cached_minilm.cache.dir.glob("*.emb")
    blob = bytearray(shard.read_bytes())
    if damage == "truncate":
        blob = blob[:-7]
    else:
        blob[-5 if damage == "flip a vector byte" else blob.index(b"\"}") + 9] ^= 0xFF
    shard.write_bytes(bytes(blob))

    cached_minilm.cache = EmbeddingCache(tmp_path / "cache", cached_minilm.name, cached_minilm.dim)
    with pytest.warns(CacheCorruptionWarning):
        again = cached_minilm.embed([HISTORY, HISTORY], [CHOSEN, REJECTED], progress=False)
    assert cached_minilm.last_stats.computed == 2
    np.testing.assert_array_equal(again, fresh)
    assert list(cached_minilm.cache.dir.glob("*.corrupt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_minilm.embed([HISTORY], [CHOSEN], progress=False)  # the rebuilt shard is clean
    assert cached_minilm.last_stats.cached == 1


def test_cache_of_another_embedder_is_never_used(tmp_path):
    keys = pair_keys(["a", "b"], ["x", "y"])
    EmbeddingCache(tmp_path, "model-A", 3).add(keys, np.ones((2, 3), np.float32))
    other = EmbeddingCache(tmp_path, "model-B", 3)
    found, _ = other.lookup(keys)
    assert not found.any() and other.dir != EmbeddingCache(tmp_path, "model-A", 3).dir


def test_cache_compaction_keeps_every_entry(tmp_path):
    cache = EmbeddingCache(tmp_path, "m", 4)
    cache.max_shards = 3
    rng = np.random.default_rng(0)
    keys = pair_keys([f"c{i}" for i in range(10)], ["r"] * 10)
    vectors = rng.normal(size=(10, 4)).astype(np.float32)
    for part in np.array_split(np.arange(10), 5):
        cache.add(keys[part], vectors[part])
    assert len(list(cache.dir.glob("*.emb"))) <= 3
    found, got = EmbeddingCache(tmp_path, "m", 4).lookup(keys[::-1])
    assert found.all()
    np.testing.assert_array_equal(got, vectors[::-1])


# ---------------------------------------------------------------------------------------------------- other models


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    config = transformers.BertConfig(
        vocab_size=minilm.tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    minilm.tokenizer.save_pretrained(path)
    return path


def test_any_local_hf_encoder(tiny_bert, minilm, tmp_path):
    embedder = load_embedder(str(tiny_bert), cache_dir=tmp_path)
    assert isinstance(embedder, SentenceEmbedder) and embedder.dim == 48
    assert embedder.name.startswith("tiny-bert@") and embedder.name != minilm.name
    emb = embedder.embed([HISTORY, HISTORY], [CHOSEN, REJECTED], progress=False)
    assert emb.shape == (2, 48) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_model_name_identifies_the_weights(tiny_bert, tmp_path):
    clone = tmp_path / "tiny-bert"
    torch.manual_seed(1)  # same architecture, other weights
    transformers.BertModel(transformers.BertConfig.from_pretrained(tiny_bert)).save_pretrained(clone)
    transformers.AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(clone)
    a = SentenceEmbedder(tiny_bert, use_cache=False).name
    assert SentenceEmbedder(clone, use_cache=False).name != a
    assert SentenceEmbedder(tiny_bert, max_length=128, use_cache=False).name != a


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(EmbeddingError, match="no such model directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")  # a tester gave the model's config.json: "no such model directory"
    with pytest.raises(EmbeddingError, match="config.json' is a file; give the model's directory"):
        resolve_model_dir(str(tmp_path / "config.json"))
    with pytest.raises(EmbeddingError, match="neither a local directory nor"):
        resolve_model_dir("no-such-org/no-such-model")


@pytest.fixture(scope="module")
def tiny_llama_rm(tmp_path_factory, minilm):
    """A random one-label LlamaForSequenceClassification with a chat template (MiniLM's vocabulary)."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama-rm"
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir(None))
    tokenizer.chat_template = "{% for m in messages %}[unused0] {{ m['role'] }} : {{ m['content'] }} [SEP]{% endfor %}"
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def test_reward_model_mode_reproduces_the_model_score(tiny_llama_rm, tmp_path):
    embedder = load_embedder(str(tiny_llama_rm), cache_dir=tmp_path)
    assert isinstance(embedder, RewardModelEmbedder) and embedder.dim == 32
    contexts, responses = [HISTORY, HISTORY[:1], "just a question"], [CHOSEN, REJECTED, "ok"]
    emb = embedder.embed(contexts, responses, progress=False)  # one right-padded batch of unequal lengths

    head = embedder.reference_head()
    assert head.shape == (32,)
    for i, (context, response) in enumerate(zip(contexts, responses)):
        ids = torch.tensor([embedder.token_ids(context, response)])  # unpadded: the model's own score
        with torch.inference_mode():
            score = embedder.model(input_ids=ids).logits[0, 0].item()
        assert head @ emb[i] == pytest.approx(score, abs=1e-5)
    one_by_one = np.concatenate([embedder.embed([c], [r], progress=False) for c, r in zip(contexts, responses)])
    np.testing.assert_allclose(one_by_one, emb, atol=1e-5)  # padding does not leak into the embedding

    with pytest.raises(EmbeddingError, match="mode must be one of"):
        load_embedder(str(tiny_llama_rm), mode="rm")
    assert isinstance(load_embedder(str(tiny_llama_rm), mode="sentence", use_cache=False), SentenceEmbedder)


def test_reward_model_truncation_drops_old_turns_first(tiny_llama_rm):
    embedder = RewardModelEmbedder(tiny_llama_rm, max_length=24, use_cache=False)
    ids = embedder.token_ids(HISTORY, "Yes.")
    last_turn = embedder.token_ids(HISTORY[-1:], "Yes.")
    assert ids == last_turn and len(ids) <= 24
    long_ids = embedder.token_ids([{"role": "user", "content": "word " * 100}], "Yes.")
    assert len(long_ids) == 24 and long_ids[-4:] == last_turn[-4:]


# ---------------------------------------------------------------------------------------------------- command


def write_dataset(directory, lines: list) -> None:
    """pairs.jsonl from records (dicts) and raw lines (strings)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    (directory / "pairs.jsonl").write_text(text)


PAIRS = [
    {"user": "user1", "conversation": "c0", "turn": 0, "history": HISTORY[:1], "chosen": CHOSEN,
     "rejected": REJECTED, "split": "train", "seen": True},
    {"user": "user1", "conversation": "c0", "turn": 1, "history": HISTORY, "chosen": CHOSEN,
     "rejected": "No idea.", "split": "test", "seen": True},
    {"user": "user2", "conversation": "c1", "turn": 0, "history": [{"role": "user", "content": "Best pet?"}],
     "chosen": "A cat: independent and affectionate.", "rejected": "Rocks.", "split": "train", "seen": False},
]  # fmt: skip


def test_embed_command_end_to_end(minilm, tmp_path, capsys):
    dataset, cache = tmp_path / "data", str(tmp_path / "cache")
    write_dataset(dataset, PAIRS)
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 384))
    np.savez(dataset / "ground_truth.npz", basis=basis, user_id=np.array(["user2", "user1", "user9"]),
             user_weights=np.array([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]]), logit_scale=np.float64(3.0),
             embedder=np.array(minilm.name))  # fmt: skip

    assert cli_main(["embed", str(dataset), "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "pairs.npz" in out and "6 embedded, 0 served from cache" in out
    pairs = load_pairs(dataset)
    contexts = [p["history"] for p in PAIRS]
    expected = minilm.embed(contexts, [p["chosen"] for p in PAIRS], progress=False) - minilm.embed(
        contexts, [p["rejected"] for p in PAIRS], progress=False
    )
    np.testing.assert_allclose(pairs.diff, expected, atol=1e-6)
    assert pairs.user.tolist() == ["user1", "user1", "user2"] and pairs.seen.tolist() == [True, True, False]
    assert pairs.split.tolist() == ["train", "test", "train"] and pairs.reference_head is None
    assert pairs.group.tolist() == ["c0", "c0", "c1"]  # the conversation: held-out sets never split it
    assert pairs.embedder == minilm.name  # stored: train and simulate copy it into basis.npz for devices
    assert pairs.pairs_jsonl_blake2b == file_digest(dataset / "pairs.jsonl")  # a later edit is detected
    weights = np.array([[1.0, 0.0], [1.0, 0.0], [0.2, 0.8]])
    np.testing.assert_allclose(pairs.logit_true, 3.0 * ((expected @ basis.T) * weights).sum(1), rtol=1e-5, atol=1e-4)

    assert cli_main(["embed", str(dataset), "--cache-dir", cache]) == 0
    assert "0 embedded, 6 served from cache" in capsys.readouterr().out

    from lore_core.basis_file import load_basis

    run = tmp_path / "run"  # the embedder's id reaches the basis that devices check their encoder against
    assert cli_main(["train", str(dataset), "--rank", "1", "--l2", "0.001", "--prior-pairs", "3", "--objective",
                     "joint", "--out", str(run)]) == 0
    assert load_basis(run / "basis.npz").embedder == minilm.name


def test_embed_names_a_max_length_beyond_the_model_by_its_flag(minilm, tmp_path, capsys):
    """The model's own range is known once it loads; the message said `max_length`, a name the user never typed."""
    dataset = tmp_path / "data"
    write_dataset(dataset, PAIRS)
    assert cli_main(["embed", str(dataset), "--max-length", "100000", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "--max-length must be in [6, 512]" in capsys.readouterr().err
    assert not (dataset / "pairs.npz").exists()
    # A tester: 5 to 7, inside the range the message gave, failed on the context's bound or in the tokenizer's
    # truncation (a traceback, exit 1); the shortest window the range allows now embeds.
    assert cli_main(["embed", str(dataset), "--max-length", "6", "--cache-dir", str(tmp_path / "cache")]) == 0


def test_embed_command_without_conversations_writes_no_group(minilm, tmp_path, capsys):
    dataset = tmp_path / "data"
    write_dataset(dataset, [{k: v for k, v in p.items() if k != "conversation"} for p in PAIRS])
    assert cli_main(["embed", str(dataset), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert load_pairs(dataset).group is None  # an older `prepare`: every pair will count as its own group
    write_dataset(dataset, [PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "conversation"}])
    assert cli_main(["embed", str(dataset), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "every line must have it or none" in capsys.readouterr().err


def test_embed_command_ground_truth_checks(minilm, tmp_path, capsys):
    dataset, cache = tmp_path / "data", str(tmp_path / "cache")
    write_dataset(dataset, PAIRS)
    truth = dict(basis=np.ones((2, 384)), user_id=np.array(["user1", "user2"]), user_weights=np.ones((2, 2)) / 2,
                 logit_scale=np.float64(1.0), embedder=np.array("some-other-embedder"))  # fmt: skip
    np.savez(dataset / "ground_truth.npz", **truth)
    assert cli_main(["embed", str(dataset), "--cache-dir", cache]) == 0
    assert "oracle (logit_true) is not available" in capsys.readouterr().err
    assert load_pairs(dataset).logit_true is None
    # A tester: the same model copied to another folder is another label, not another embedder
    copied = "my-copy" + minilm.name[minilm.name.index("@"):]
    np.savez(dataset / "ground_truth.npz", **{**truth, "basis": np.ones((2, 384)), "embedder": np.array(copied)})
    assert cli_main(["embed", str(dataset), "--cache-dir", cache]) == 0
    assert "not available" not in capsys.readouterr().err and load_pairs(dataset).logit_true is not None

    np.savez(dataset / "ground_truth.npz", **{**truth, "basis": np.ones((2, 16)), "embedder": np.array(minilm.name)})
    assert cli_main(["embed", str(dataset), "--cache-dir", cache]) == 2
    assert "shape (2, 16)" in capsys.readouterr().err


def test_embed_command_refuses_users_without_true_weights_before_embedding(minilm, tmp_path, capsys):
    """Found by a tester: a pair of a user the benchmark's truth lacks was refused after every pair was embedded."""
    dataset, cache = tmp_path / "data", tmp_path / "cache"
    write_dataset(dataset, PAIRS)
    np.savez(dataset / "ground_truth.npz", basis=np.ones((2, 384)), user_id=np.array(["user1"]),
             user_weights=np.ones((1, 2)) / 2, logit_scale=np.float64(1.0), embedder=np.array(minilm.name))
    assert cli_main(["embed", str(dataset), "--cache-dir", str(cache)]) == 2
    assert "users without ground-truth weights: ['user2']" in capsys.readouterr().err
    assert not list(cache.rglob("*.emb")) and not (dataset / "pairs.npz").exists()  # nothing was embedded


def test_embed_command_refuses_what_it_cannot_write_or_read_before_embedding(tmp_path, capsys):
    """Found by a tester: a pairs.npz that is a directory, or a --cache-dir that is a file, failed with a bare errno
    message after the embedding; a pairs.jsonl given for its directory was reported as '.../pairs.jsonl/pairs.jsonl
    not found'."""
    dataset, cache = tmp_path / "data", tmp_path / "cache"
    write_dataset(dataset, PAIRS)
    (dataset / "pairs.npz").mkdir()
    assert cli_main(["embed", str(dataset), "--cache-dir", str(cache)]) == 2
    assert f"{dataset / 'pairs.npz'} is a directory, where embed writes the pair file" in capsys.readouterr().err
    assert not cache.exists()  # nothing was embedded
    (dataset / "pairs.npz").rmdir()

    cache.write_text("not a directory")
    assert cli_main(["embed", str(dataset), "--cache-dir", str(cache)]) == 2
    assert f"the embedding cache (--cache-dir) {cache} is a file" in capsys.readouterr().err
    assert not (dataset / "pairs.npz").exists()

    assert cli_main(["embed", str(dataset / "pairs.jsonl"), "--cache-dir", str(tmp_path / "c2")]) == 2
    assert "pairs.jsonl is a file; give the dataset directory that holds pairs.jsonl" in capsys.readouterr().err


# `python -c` driver: `lore-fed embed` whose third forward pass is ended by kill -TERM, as a scheduler or `timeout` does.
EMBED_TERMINATED = """
import os, signal, sys
from lore_core.embeddings import SentenceEmbedder
encode, calls = SentenceEmbedder._encode, []

def encode_then_terminated(self, contexts, responses):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return encode(self, contexts, responses)

SentenceEmbedder._encode = encode_then_terminated
from lore_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_embed_ended_by_sigterm_keeps_what_it_computed_for_the_rerun(tmp_path, capsys):
    """Found by a tester: kill -TERM ended embed at once, and the rows computed since the last cache flush (up to
    4,096) were lost; Ctrl-C kept them. Now both do, and the rerun serves them from the cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dataset, cache = tmp_path / "data", str(tmp_path / "cache")
    write_dataset(dataset, PAIRS)
    argv = ["embed", str(dataset), "--cache-dir", cache, "--batch-size", "1"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EMBED_TERMINATED, *argv], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert not (dataset / "pairs.npz").exists()
    assert cli_main(argv) == 0
    assert "4 embedded, 2 served from cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json\n", "not valid JSON"),
        ({**PAIRS[0], "split": "dev"}, "'split' must be one of"),
        ({**PAIRS[0], "history": [{"role": "bot", "content": "x"}]}, "'history'"),
        ({k: v for k, v in PAIRS[0].items() if k != "chosen"}, "missing keys ['chosen']"),
        # found by a tester: an escaped lone surrogate parsed, then failed in the cache key's encode, naming no file
        ({**PAIRS[0], "rejected": "caf\ud800"}, "\\ud800 is half of a UTF-16 surrogate pair"),
        # found by a tester: a user both seen and unseen was refused only after every pair was embedded
        ({**PAIRS[0], "seen": False}, "user 'user1' has 'seen' false, but true on line 1"),
        # found by a tester: numpy dropped the NUL, and user 'user2\x00' was merged into user2 without a word
        ({**PAIRS[2], "user": "user2\x00"}, "'user' must be non-empty text without control or bidirectional"),
        # a tester: an empty id was a user, and one with U+202E reversed the messages that printed it
        ({**PAIRS[2], "user": ""}, "1 is not: ''"),
        ({**PAIRS[2], "user": "user2\u202e"}, "1 is not: 'user2\\u202e'"),
        # a tester: what `prepare` drops was embedded as a tie (scored an error) or with its label reversed
        ({**PAIRS[2], "rejected": PAIRS[2]["chosen"]}, "'chosen' and 'rejected' are the same text"),
        ({**PAIRS[2], "chosen": ""}, "'chosen' is empty"),
        ({**PAIRS[2], "chosen_score": 2, "rejected_score": 5}, "'chosen_score' 2 is below 'rejected_score' 5"),
    ],
)
def test_embed_command_names_the_bad_line(tmp_path, capsys, bad_line, message):
    write_dataset(tmp_path, [PAIRS[0], PAIRS[1], bad_line])
    assert cli_main(["embed", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl line 3:" in err and message in err


def test_embed_refuses_user_ids_in_two_unicode_forms_before_embedding(tmp_path, capsys):
    """A tester: twins ('é' composed and decomposed) were refused only when pairs.npz was written, after every text
    was embedded and cached."""
    write_dataset(tmp_path, [{**PAIRS[0], "user": "Jos\u00e9"}, {**PAIRS[1], "user": "Jose\u0301"}, PAIRS[2]])
    assert cli_main(["embed", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl: 1 group(s) of 'user' values are the same text in different Unicode forms" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "pairs.npz").exists()


def test_embed_command_reward_model_adds_reference_head(tiny_llama_rm, tmp_path, capsys):
    write_dataset(tmp_path, PAIRS)
    args = ["embed", str(tmp_path), "--model", str(tiny_llama_rm), "--cache-dir", str(tmp_path / "cache")]
    assert cli_main(args) == 0
    pairs = load_pairs(tmp_path)
    embedder = RewardModelEmbedder(tiny_llama_rm, use_cache=False)
    np.testing.assert_array_equal(pairs.reference_head, embedder.reference_head())
    assert pairs.embedder == embedder.name
    assert pairs.dim == 32 and "reference_head" in capsys.readouterr().out


def test_embed_refuses_a_pairs_jsonl_edited_while_it_embeds(tmp_path, capsys, monkeypatch):
    """Found by a review: embed hashed pairs.jsonl first and wrote pairs.npz last, so an edit in between left a
    pairs.jsonl older than pairs.npz that no reader hashes: the stale pairs were used without a word. embed now
    checks pairs.jsonl's size and time again before it writes, and writes nothing when they moved."""
    import lore_core.embeddings as embeddings

    dataset = tmp_path / "data"
    write_dataset(dataset, PAIRS)
    real_embed = embeddings._PairEmbedder.embed

    def edit_while_embedding(self, contexts, responses, **kwargs):
        with open(dataset / "pairs.jsonl", "a") as text:
            text.write(json.dumps({**PAIRS[0], "user": "user3"}) + "\n")
        return real_embed(self, contexts, responses, **kwargs)

    monkeypatch.setattr(embeddings._PairEmbedder, "embed", edit_while_embedding)
    assert cli_main(["embed", str(dataset), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl changed while its pairs were embedded; nothing was written" in err, err
    assert not (dataset / "pairs.npz").exists()
