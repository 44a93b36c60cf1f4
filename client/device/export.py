"""Export the pair encoder (MiniLM + mean pooling + L2 normalisation) to ONNX for the device.

Exporting needs torch and transformers, so they are imported inside the functions: the device runtime imports
this module's neighbours only. The ONNX file holds the encoder alone (output `pair_emb`, (N, D) float32); the
basis stays a separate small file, so a new federated basis needs no new ONNX file. No int8 (it distorts
embeddings: cos to fp32 down to 0.87).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from client.device.encoder import (
    ENCODER_FORMAT,
    ENCODER_META,
    INPUTS,
    MODEL_FILE,
    PAIR_MODE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    EncoderError,
    OnnxPairEncoder,
    file_sha256,
)
from lore_core.atomic_io import atomic_write_bytes, atomic_write_json

INPUT_NAMES = tuple(INPUTS)
EXPORT_TOLERANCE = 1e-5
_CHECK_CONTEXTS = ["user: hello", "user: how do I bake bread?\nassistant: " + "With flour. " * 80 + "\nuser: yeast?"]
_CHECK_RESPONSES = ["Hi! How can I help you today?", "Yes, " + "knead the dough and let it rise. " * 60]


def export_encoder(out_dir: str | Path, model: str | None = None) -> Path:
    """Export `model` (a local path or cached hub name; None = the offline all-MiniLM-L6-v2) to `out_dir`.

    The encoder is lore_core.embeddings.SentenceEmbedder (one source of truth for the model, the tokenizer settings
    and the embedder name). Writes model.onnx, tokenizer.json and encoder.json (name, dim, lengths, checksums) to a
    staging directory inside `out_dir` (the directory the user gave and the command checked: the same filesystem),
    checks that the device encoder reproduces SentenceEmbedder to EXPORT_TOLERANCE, and only then moves the files
    into `out_dir` (encoder.json last). An export that fails its check leaves `out_dir` as it was: a tester found a
    failed export's encoder, with valid checksums, left for `init` to accept. Returns out_dir.
    """
    from lore_core.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder(model, use_cache=False)
    if not getattr(embedder.tokenizer, "is_fast", False):
        raise EncoderError(f"{model}: the device needs a fast tokenizer (tokenizer.json); this model has none")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    stage = out / f"{STAGE_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        _export_checked(embedder, stage)
        for name in (MODEL_FILE, TOKENIZER_FILE, ENCODER_META):  # the checksums' file last
            os.replace(stage / name, out / name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # it was made for this export: nothing else is in it
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


STAGE_PREFIX = ".export-"


def _remove_stale_stages(out: Path) -> None:
    """Staging directories of exports that were killed (their process is gone); a running export's is kept."""
    for path in out.glob(f"{STAGE_PREFIX}*"):
        try:
            os.kill(int(path.name.removeprefix(STAGE_PREFIX)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not a pid of ours, or a live process of another user


def _export_checked(embedder, out: Path) -> None:
    """The export itself, into `out`, and its check against `embedder`."""
    import torch

    module = _pooled(embedder.model).eval()
    sample = embedder.tokenizer(["user: hi", "user: and then?"], ["Hello!", "Then it rises."], padding=True,
                                return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=embedder.max_length)
    with torch.inference_mode(), warnings.catch_warnings():
        # torch's notes to itself about dynamic axis names, shown to users as `note:` lines (a tester)
        warnings.filterwarnings("ignore", message=r"# The axis name: ")
        program = torch.onnx.export(
            module, tuple(sample[name] for name in INPUT_NAMES), input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME], dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
            dynamo=True, external_data=False,
        )
    import onnx

    model_proto = program.model_proto
    onnx.checker.check_model(model_proto, full_check=True)
    atomic_write_bytes(out / MODEL_FILE, model_proto.SerializeToString())
    atomic_write_bytes(out / TOKENIZER_FILE, embedder.tokenizer.backend_tokenizer.to_str().encode())
    meta = {
        "format": ENCODER_FORMAT,
        "embedder": embedder.name,
        "dim": embedder.dim,
        "max_length": embedder.max_length,
        "max_context_tokens": embedder.max_context_tokens,
        "pair_mode": PAIR_MODE,
        "output": OUTPUT_NAME,
        "inputs": list(INPUT_NAMES),
        "sha256": {MODEL_FILE: file_sha256(out / MODEL_FILE), TOKENIZER_FILE: file_sha256(out / TOKENIZER_FILE)},
    }
    atomic_write_json(out / ENCODER_META, meta)
    device = OnnxPairEncoder(out, verify=True).embed(_CHECK_CONTEXTS, _CHECK_RESPONSES)
    gap = float(np.abs(device - embedder.embed(_CHECK_CONTEXTS, _CHECK_RESPONSES, progress=False)).max())
    if gap > EXPORT_TOLERANCE:
        raise EncoderError(f"the exported encoder differs from {embedder.name} by {gap:.2e} (above "
                           f"{EXPORT_TOLERANCE:g}); nothing was written")


def _pooled(encoder):
    """Wrap a transformers encoder: ids/mask/types (N, L) -> L2-normalised masked mean of hidden states (N, D)."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return PooledEncoder()
