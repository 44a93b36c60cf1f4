"""The device's pair encoder: an exported ONNX MiniLM run with onnxruntime and the `tokenizers` package.

No torch, no transformers. The input follows lore_core.embeddings.SentenceEmbedder exactly: a context longer than
`max_context_tokens` is cut from the left with the same `trim_context_left`, then the pair is tokenized like
transformers' `tokenizer(contexts, responses, truncation="only_second", max_length=256, padding=True)`; the ONNX
graph does mean pooling and L2 normalisation, so `embed` returns the server's (N, D) float32 vectors (to ~1e-7).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from lore_core.embeddings import trim_context_left
from lore_core.text_file import is_json_integer, is_name, json_loads

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_META = "encoder.json"
OUTPUT_NAME = "pair_emb"
ENCODER_FORMAT = "lore-fed-onnx-encoder/1"
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_SIZE = 32
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # hashlib's hexdigest()


class EncoderError(ValueError):
    """A missing, incomplete or corrupted encoder directory, or text it cannot encode."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_encoder_meta(directory: str | Path, *, verify: bool = False) -> dict:
    """encoder.json of an exported encoder; `verify` also checks the model and tokenizer checksums (~0.2 s)."""
    directory = Path(directory)
    meta_path = directory / ENCODER_META
    if not meta_path.is_file():
        raise EncoderError(
            f"{directory} is not an exported encoder (no {ENCODER_META}); "
            "create one with `lore-fed device export-encoder --out DIR` (or `python -m client.device export-encoder`)"
        )
    try:
        meta = json_loads(meta_path.read_text())
        dim, output, checksums = meta["dim"], meta["output"], meta["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EncoderError(f"{meta_path}: unreadable encoder metadata ({exc})") from exc
    if not is_json_integer(dim, low=1):  # "dim": Infinity, 384.9, true or "384" is no width
        raise EncoderError(f"{meta_path}: dim must be the embedding width, a positive integer; got "
                           f"{json.dumps(dim)[:40]}; export the encoder again")
    embedder = meta.get("embedder")
    if embedder is not None and not is_name(embedder):
        raise EncoderError(f"{meta_path}: embedder must be the name of the model, a non-empty string without "
                           "control characters; got "
                           f"{json.dumps(embedder)[:100]}; export the encoder again")
    if meta.get("format") != ENCODER_FORMAT or dim <= 0 or output != OUTPUT_NAME:
        raise EncoderError(
            f"{meta_path}: expected format {ENCODER_FORMAT!r}, dim > 0, output {OUTPUT_NAME!r}; "
            f"got {meta.get('format')!r}, {dim}, {output!r}"
        )
    if not (isinstance(checksums, dict) and all(isinstance(checksums.get(name), str)
                                                and SHA256_HEX.fullmatch(checksums[name])
                                                for name in (MODEL_FILE, TOKENIZER_FILE))):
        raise EncoderError(
            f'{meta_path}: expected "sha256": {{"{MODEL_FILE}": DIGEST, "{TOKENIZER_FILE}": DIGEST}}, each DIGEST 64 '
            f"lowercase hex characters; got {json.dumps(checksums)[:200]}; export the encoder again"
        )
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise EncoderError(f"{directory}: {name} is missing")
        if verify and file_sha256(directory / name) != checksums[name]:
            raise EncoderError(f"{directory / name}: checksum mismatch (file corrupted or replaced); export again")
    return meta


def encoder_identity(meta: dict) -> dict:
    """Which model an exported encoder holds, from its encoder.json (`read_encoder_meta`; nothing is hashed):
    {"embedder": name | None, "sha256": {MODEL_FILE: digest, TOKENIZER_FILE: digest}}. A device state records it
    when its encoder is set, to notice another model exported into the same directory later."""
    name = meta.get("embedder")
    return {"embedder": name if isinstance(name, str) else None,
            "sha256": {file: meta["sha256"][file] for file in (MODEL_FILE, TOKENIZER_FILE)}}


def is_encoder_identity(value) -> bool:
    """Whether `value` (read back from a state's manifest) has the form `encoder_identity` returns."""
    return (isinstance(value, dict) and set(value) == {"embedder", "sha256"}
            and (value["embedder"] is None or isinstance(value["embedder"], str))
            and isinstance(value["sha256"], dict) and set(value["sha256"]) == {MODEL_FILE, TOKENIZER_FILE}
            and all(isinstance(digest, str) and SHA256_HEX.fullmatch(digest) for digest in value["sha256"].values()))


# The embedder name's end, `lore_core.embeddings.SentenceEmbedder.name`: the window its embeddings were made with
_WINDOW = re.compile(r"/max(\d+)/ctx(\d+)")
PAIR_MODE = "segment"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]  # what `tokenize` gives the graph


def check_pipeline(meta: dict, name: str, max_length: int, max_context_tokens: int, where: Path) -> None:
    """Refuse an encoder.json whose input settings are not those its embedder was exported with: only the model and
    the tokenizer are checksummed, and a tester's edited max_context_tokens changed every score without a word."""
    window = _WINDOW.search(name)
    if window and (int(window[1]), int(window[2])) != (max_length, max_context_tokens):
        raise EncoderError(f"{where}: max_length {max_length} and max_context_tokens {max_context_tokens}, but its "
                           f"embedder {name!r} was exported with {window[1]} and {window[2]}: the file was edited; "
                           "export the encoder again")
    if meta.get("pair_mode", PAIR_MODE) != PAIR_MODE or meta.get("inputs", INPUTS) != INPUTS:
        raise EncoderError(f"{where}: pair_mode must be {PAIR_MODE!r} and inputs {INPUTS} (what this encoder feeds "
                           f"the model); got {json.dumps(meta.get('pair_mode'))[:40]} and "
                           f"{json.dumps(meta.get('inputs'))[:100]}; export the encoder again")


class OnnxPairEncoder:
    """Segment-pair encoder: embed(contexts (N,), responses (N,)) -> (N, D) float32, L2-normalised."""

    def __init__(self, directory: str | Path, *, threads: int | None = None, verify: bool = False):
        # onnxruntime (1.32 on Linux too) records telemetry in ~/.cache/Microsoft/DeveloperTools for upload to
        # Microsoft: a device id, the process path, the model file's name, how many texts each call embedded. None of
        # it has a reason to leave the device; the switch is read when the library loads, so it is set before.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self.meta = read_encoder_meta(self.directory, verify=verify)
        self.dim = int(self.meta["dim"])
        self.name = str(self.meta["embedder"])
        self.max_length = self.meta.get("max_length", DEFAULT_MAX_LENGTH)
        self.max_context_tokens = self.meta.get("max_context_tokens",
                                                self.max_length // 2 if is_json_integer(self.max_length) else None)
        if not is_json_integer(self.max_length, 8, 1 << 16) or \
                not is_json_integer(self.max_context_tokens, 0, self.max_length - 1):
            raise EncoderError(f"{self.directory / ENCODER_META}: max_length {json.dumps(self.max_length)[:40]} must "
                               f"be an integer in 8..65536 and max_context_tokens "
                               f"{json.dumps(self.max_context_tokens)[:40]} one in 0..max_length - 1; export the "
                               "encoder again")
        check_pipeline(self.meta, self.name, self.max_length, self.max_context_tokens, self.directory / ENCODER_META)
        try:
            tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises a bare Exception for a torn or foreign file
            raise EncoderError(f"{self.directory / TOKENIZER_FILE}: the tokenizers package cannot read it ({exc}); "
                               "export the encoder again") from exc
        pad = tokenizer.padding or {"pad_id": tokenizer.token_to_id("[PAD]") or 0, "pad_token": "[PAD]"}
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._context_tokenizer = Tokenizer.from_str(tokenizer.to_str())  # plain: offsets for context trimming
        # tokenizer.json ships its own defaults (MiniLM: fixed padding to 128, longest-first truncation at 128):
        # replace them with transformers' per-call pair settings (pad to the longest in the batch, on the right).
        tokenizer.enable_truncation(self.max_length, strategy="only_second", direction="right")
        tokenizer.enable_padding(pad_id=pad["pad_id"], pad_type_id=0, pad_token=pad["pad_token"])
        self.tokenizer = tokenizer
        options = onnxruntime.SessionOptions()
        threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        options.intra_op_num_threads = max(threads, 0)
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.directory / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for a torn model
            raise EncoderError(f"{self.directory / MODEL_FILE}: onnxruntime cannot load it ({exc})") from exc
        self.input_names = [item.name for item in self.session.get_inputs()]

    def tokenize(self, contexts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        """(N, L) int64 arrays input_ids, attention_mask, token_type_ids, L = longest pair in the batch."""
        if len(contexts) != len(responses):
            raise EncoderError(f"got {len(contexts)} contexts but {len(responses)} responses")
        spans = self._context_tokenizer.encode_batch(list(contexts), add_special_tokens=False)
        contexts = [trim_context_left(c, e.offsets, self.max_context_tokens) for c, e in zip(contexts, spans)]
        try:
            encodings = self.tokenizer.encode_batch(list(zip(contexts, responses)))
        except Exception as exc:  # tokenizers raises a bare Exception for an over-long first segment
            raise EncoderError(
                f"cannot encode a pair within {self.max_length} tokens ({exc})"
            ) from exc
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def embed(self, contexts: list[str], responses: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(n, D) float32 embeddings of n (context, response) pairs: two lists of n strings. A string in place of a
        list embedded each of its characters as a pair, and a number reached the tokenizer's own error (a tester)."""
        for name, texts in (("contexts", contexts), ("responses", responses)):
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                held = sorted({type(t).__name__ for t in texts}) if isinstance(texts, (list, tuple)) else []
                raise EncoderError(f"{name} must be a list of strings, got {type(texts).__name__}"
                                   + (f" holding {held}" if held else ""))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EncoderError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if len(contexts) != len(responses):
            raise EncoderError(f"got {len(contexts)} contexts but {len(responses)} responses")
        out = np.empty((len(contexts), self.dim), dtype=np.float32)
        for start in range(0, len(contexts), batch_size):
            stop = start + batch_size
            feed = self.tokenize(contexts[start:stop], responses[start:stop])
            out[start:stop] = self.session.run([OUTPUT_NAME], {k: feed[k] for k in self.input_names})[0]
        return out
