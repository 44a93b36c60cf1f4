"""`python -m client.device ...` (also `lore-fed device ...`): personalize and rank on a device without torch.

  init --basis FILE [--encoder DIR] [--reinit]   create the state (or adopt a new basis with --reinit)
  adapt --choices FILE                           learn w from the user's choices (JSONL/JSON, or .npz of `diff`)
  rank --prompt TEXT --candidates FILE           personalized best-of-N with scores [--strength S|off]
  next-question --candidates POOL [--k K]        the K pool pairs whose answers would teach the most (JSON)
  declare FIELD=VALUE ... --priors TABLE          a prior from declared attributes (kept on the device) [--clear]
  strength [S|off]                               show or set the personalization strength
  status                                         what the state holds and how sure it is about w
  forget [--all]                                 delete all personal data (--all: the whole state directory)
  export-encoder --out DIR [--model NAME]        export the ONNX encoder (needs torch; run it off the device)
Only export-encoder imports torch/transformers; the other commands use numpy, onnxruntime and tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from client.device import attribute_prior, personalize, posterior, questions, ranking, user_posterior
from client.device.pool import answered, as_choice, read_pool, repeated
from client.device.state import (
    BasisMismatchError,
    DeviceState,
    StateCorruptError,
    StateError,
    check_compatible,
    default_state_dir,
    forget,
    holds_other_files,
    is_device_state,
    load_state,
    new_state,
    only_init_leftovers,
    salvage_choices,
    salvage_settings,
    save_state,
    state_lock,
)
from lore_core.atomic_io import empty_path_flag
from lore_core.basis_file import UNKNOWN_EMBEDDER, BasisFile, basis_file_path, load_basis, other_embedders
from lore_core.closed_stdout import stdout_closed
from lore_core.command_line import parse_command_line
from lore_core.text_file import not_a_file, parse_json, read_text, shown


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, default=None,
                        help="state directory (default: $LORE_DEVICE_HOME, else ~/.lore-fed/device)")
    sub = parser.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create the device state from a basis file")
    p.add_argument("--basis", type=Path, required=True,
                   help="basis .npz (lore_core.basis_file format), or a run directory holding basis.npz")
    p.add_argument("--encoder", type=Path, help="exported ONNX encoder directory (from export-encoder)")
    p.add_argument("--reinit", action="store_true",
                   help="adopt a basis of another version or dimension: refit w (re-embed choices if needed)")
    p.set_defaults(_handler=_init)

    p = sub.add_parser("adapt", help="learn the user's weights from their choices (incremental)")
    p.add_argument("--choices", type=Path, required=True,
                   help='JSONL or JSON list of {"history"|"prompt", "chosen", "rejected"}; or .npz with diff (n, D)')
    p.add_argument("--encoder", type=Path, help="override the state's encoder directory")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(_handler=_adapt)

    p = sub.add_parser("rank", help="rank candidate responses for this user (best first)")
    p.add_argument("--prompt", required=True, help="the user's message the candidates answer")
    p.add_argument("--candidates", type=Path, required=True, help="text file (one per line) or a JSON list")
    p.add_argument("--strength", help="override the stored strength: a number in [0, 1] or 'off'")
    p.add_argument("--encoder", type=Path, help="override the state's encoder directory")
    p.add_argument("--json", action="store_true",
                   help="print JSON: rewards with 90%% intervals and calibrated pairwise preference probabilities")
    p.set_defaults(_handler=_rank)

    p = sub.add_parser("next-question", help="pick the pool pairs whose answers would teach the most (JSON)")
    p.add_argument("--candidates", type=Path, required=True,
                   help='pool: JSONL or JSON list of {"history"|"prompt", "responses": [A, B]}; or .npz with diff')
    p.add_argument("--k", type=int, default=1, help=f"how many pairs to ask at once, 1 to {questions.MAX_BATCH} "
                   "(default 1; fewer when fewer are unanswered)")
    p.add_argument("--encoder", type=Path, help="override the state's encoder directory")
    p.set_defaults(_handler=_next_question)

    p = sub.add_parser("declare", help="set a prior from declared attributes; they never leave the device")
    p.add_argument("attributes", nargs="*", metavar="FIELD=VALUE", help="e.g. age='25-34 years old'")
    p.add_argument("--priors", type=Path, help="the attribute prior table shipped with the basis")
    p.add_argument("--clear", action="store_true", help="drop the declared attributes (back to the population)")
    p.set_defaults(_handler=_declare)

    p = sub.add_parser("strength", help="show or set the personalization strength (0 = population, 1 = personal)")
    p.add_argument("value", nargs="?", help="a number in [0, 1] or 'off'")
    p.set_defaults(_handler=_strength)

    p = sub.add_parser("status", help="print what the device state holds (JSON)")
    p.set_defaults(_handler=_status)

    p = sub.add_parser("forget", help="delete all personal data (weights, pairs, raw choices)")
    p.add_argument("--all", action="store_true", help="delete the whole state directory, basis included")
    p.set_defaults(_handler=_forget)

    p = sub.add_parser("export-encoder", help="export the ONNX encoder (needs torch; not a device command)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--model", help="model path or cached hub name (default: the offline all-MiniLM-L6-v2)")
    p.set_defaults(_handler=_export)


def run(args: argparse.Namespace) -> int:
    return int(args._handler(args) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.device", description=__doc__.splitlines()[0])
    configure(parser)
    argv = sys.argv[1:] if argv is None else argv
    if empty := empty_path_flag(argv):
        print(f"python -m client.device: error: {empty} is empty or blank; give a path", file=sys.stderr)
        return 2
    args = parse_command_line(parser, argv)
    formatter, warnings.formatwarning = warnings.formatwarning, lambda message, *_, **__: f"note: {message}\n"
    from lore_core.termination import interruption_kind, terminated_as_interrupt

    try:
        with terminated_as_interrupt():  # kill -TERM ends it as Ctrl-C does (a tester's SIGTERM died silently)
            code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is handled below
        return code
    except (ValueError, FileNotFoundError) as exc:
        print(f"client.device {args.device_command}: error: {exc}{getattr(exc, 'advice', '')}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not stdout_closed():  # a pipe other than stdout: a real failure
            raise
        return 141  # whoever read the output stopped (`| head`): no traceback, as other tools
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"client.device {args.device_command}: error: {exc}", file=sys.stderr)  # e.g. permission denied
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: every write is atomic, so the state is the last committed
        partly = args.device_command == "forget" and getattr(args, "all", False)  # deletes file by file
        state = ("some of the state's files may already be deleted" if partly else
                 "the device state is as the last completed command left it")
        how, code = interruption_kind(exc)
        print(f"client.device {args.device_command}: {how}; {state}: run the command again", file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = formatter


# --- commands -------------------------------------------------------------------------------------------------


def _init(args) -> int:
    from lore_core.atomic_io import check_output_path

    directory = _directory(args)
    check_output_path(directory, _state_source(args), directory=True)
    basis = load_basis(basis_file_path(args.basis))  # a run directory too, as `evaluate` takes (a tester)
    encoder, identity = _checked_encoder_dir(args.encoder, basis) if args.encoder else (None, None)
    if directory.is_dir() and holds_other_files(directory) and not is_device_state(directory):
        raise StateError(f"{directory} holds other files and is not a device state; give `--state` a new or empty "
                         "directory")
    with state_lock(directory, create=True):
        state = _initial_state(directory, basis, encoder, identity, args.reinit)
        state = save_state(state)
    print(f"device state in {directory}: basis v{basis.version} ({basis.rank} x {basis.dim}, {basis.embedder}), "
          f"{state.n_pairs} pairs, encoder {state.encoder or 'none'}")
    return 0


def _initial_state(directory: Path, basis: BasisFile, encoder: str | None, identity: dict | None,
                   reinit: bool) -> DeviceState:
    """The state `init` saves: a new one, the existing one (adopting the basis with --reinit), or with --reinit a
    corrupted one repaired."""
    try:
        old = load_state(directory)
    except StateCorruptError:
        if not reinit:
            raise
        return _repaired(directory, basis, encoder, identity)
    except StateError:  # no state there yet
        return new_state(directory, basis, encoder=encoder, encoder_identity=identity)
    state = _with_encoder(old, encoder, identity)
    try:
        check_compatible(old, basis)
    except BasisMismatchError:
        if not reinit:
            raise
        state = _rebase(state, basis)
    return state


_DROPPED_ATTRIBUTES = ("dropped the declared attributes: their prior belongs to the old basis; declare them again "
                       "with the new basis' table")


def _repaired(directory: Path, basis: BasisFile, encoder: str | None, identity: dict | None) -> DeviceState:
    """--reinit on a corrupted state: afresh, keeping its stored choices where its personal file is intact."""
    salvaged = salvage_choices(directory, basis)
    if salvaged is None:
        settings = salvage_settings(directory, basis)
        if settings is None:
            print(f"the state in {directory} is corrupted: starting afresh (--reinit); none of it could be kept")
            return new_state(directory, basis, encoder=encoder, encoder_identity=identity)
        print(f"the state in {directory} is corrupted: starting afresh (--reinit) with its settings (strength, "
              "encoder); its stored choices could not be kept")
        return _with_encoder(settings, encoder, identity)
    kept, declared = salvaged
    print(f"the state in {directory} is corrupted: starting afresh (--reinit), keeping its {kept.n_pairs} stored "
          "choices (its personal file is intact) and refitting w")
    if declared:
        print(_DROPPED_ATTRIBUTES)
    return user_posterior.refit(_with_encoder(kept, encoder, identity))[0]


def _with_encoder(state: DeviceState, encoder: str | None, identity: dict | None) -> DeviceState:
    """An --encoder given to `init` replaces the state's own and its recorded identity; without one the state keeps
    both."""
    return replace(state, encoder=encoder, encoder_identity=identity) if encoder else state


def _adapt(args) -> int:
    directory = _directory(args)
    with state_lock(directory):
        state = load_state(directory)
        _require_learning(state, "no choices are learned")
        diff, records = _choice_diffs(args.choices, state, args.encoder)
        _check_same_user(state, records, args.choices)
        fresh = _not_yet_learned(state, diff, records)
        if not fresh.all():
            print(f"skipped {int((~fresh).sum())} of {fresh.size} choices already learned or repeated in "
                  f"{args.choices} (the same prompt, chosen and rejected, or the same pair difference): a rerun "
                  "after an interruption does not count them twice, nor does a file that gives a choice twice",
                  file=sys.stderr)
            diff, records = diff[fresh], [r for r, keep in zip(records, fresh) if keep]
        if flipped := _answered_the_other_way(state, diff, records):
            print(f"note: {flipped} of the new choices answer a pair the other way from an earlier answer (in the "
                  "state or in this file): both answers are kept (Bradley-Terry reads them as a close call); to drop "
                  "one, `forget` (it deletes every choice) and adapt again with the answers to keep", file=sys.stderr)
        pair_diff = np.concatenate([state.pair_diff, diff.astype(np.float32)])
        choices = state.choices + tuple(json.dumps(r, ensure_ascii=False) for r in records)
        start = time.perf_counter()
        state, result = user_posterior.refit(replace(state, pair_diff=pair_diff, choices=choices))
        fit_ms = 1e3 * (time.perf_counter() - start)
        if records:  # nothing new: the state on disk stays as it is, its generation too (a tester)
            state = save_state(state)
    spread = user_posterior.confidence(state, user_posterior.samples(state))["spread"]
    summary = {
        "added": len(records), "pairs": state.n_pairs, "iterations": result.iterations,
        "converged": result.converged, "fit_ms": round(fit_ms, 3), "train_accuracy": result.train_accuracy,
        "user_weights": [round(float(x), 6) for x in result.user_weights], "spread": spread,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"learned from {len(records)} new choices ({state.n_pairs} in all) in {fit_ms:.1f} ms; "
              f"agrees with {100 * result.train_accuracy:.0f}% of them; w = {np.round(result.user_weights, 3)}; "
              f"spread {spread:.3f}")
    return 0


def _rank(args) -> int:
    if not personalize.is_unicode_text(args.prompt):
        raise ValueError(f"--prompt {personalize.NOT_UNICODE} (is the terminal's encoding UTF-8?)")
    if personalize.is_blank(args.prompt):
        raise ValueError("--prompt is blank: give the user's message the candidates answer")
    state = load_state(_directory(args))
    strength = state.strength if args.strength is None else personalize.parse_strength(args.strength, "--strength")
    candidates = _read_candidates(args.candidates)
    encoder = _open_encoder(state, args.encoder)
    from lore_core.embeddings import render_context

    context = render_context([{"role": "user", "content": args.prompt}])
    embeddings = encoder.embed([context] * len(candidates), candidates)
    weights = personalize.effective_weights(user_posterior.point_weights(state), strength, state.basis.rank)
    rewards = ranking.candidate_rewards(state.basis.basis, weights, embeddings)
    order = ranking.rank_order(rewards)
    drawn = user_posterior.samples(state)
    sampled = personalize.effective_weights(drawn.w, strength, state.basis.rank)  # (1, S, B)
    uncertain = posterior.PosteriorSamples(w=np.broadcast_to(sampled, drawn.w.shape), probability=drawn.probability)
    low, high = ranking.reward_intervals(state.basis.basis, uncertain, embeddings)
    rows = [{"rank": r + 1, "index": int(i), "score": float(rewards[i]),
             "interval_90": [float(low[i]), float(high[i])], "text": candidates[i]} for r, i in enumerate(order)]
    if args.json:  # the (N, N) matrix only where it is printed (a tester: the plain ranking grew as N^2 too)
        prefer = ranking.preference_matrix(state.basis.basis, uncertain, embeddings)
        mode = "off" if strength is None else strength
        applied = user_posterior.point_weights(state) is not None and bool(strength)
        personalization = _personalization_at(state, strength, user_posterior.confidence(state, drawn))
        print(json.dumps({"strength": mode, "personalized": applied, "personalization": personalization,
                          "ranking": rows, "preference_probability": np.round(prefer, 4).tolist()},
                         ensure_ascii=False))
    else:
        for row in rows:
            low_r, high_r = row["interval_90"]
            print(f"{row['rank']:>3}  {row['score']:+.5f}  [{low_r:+.4f}, {high_r:+.4f}]  {shown(row['text'])}")
    return 0


def _next_question(args) -> int:
    if not 1 <= args.k <= questions.MAX_BATCH:
        raise ValueError(f"--k must be between 1 and {questions.MAX_BATCH} (the pairs asked at once), got {args.k}")
    state = load_state(_directory(args))
    _require_learning(state, "no answer would be learned (`adapt` refuses it), so no question is asked")
    pool = read_pool(args.candidates, state.basis.dim)
    if pool.records is not None:
        diff = embed_choices(_open_encoder(state, args.encoder), [as_choice(r, 0) for r in pool.records])
    else:
        diff = pool.diff
    start = time.perf_counter()
    # Distinct questions not yet answered, each of which teaches something: a zero row (both responses embed alike)
    # carries no preference, and `adapt` refuses it in an .npz file; it is never asked (a tester got one at 0 bits).
    available = (~answered(pool, state.choices, state.pair_diff, diff) & ~repeated(pool, diff)
                 & ~personalize.tied_rows(diff))
    picked, gains, best = user_posterior.next_questions(state, diff, available, args.k)
    selection_ms = 1e3 * (time.perf_counter() - start)
    stop = bool(questions.should_stop(best, int(available.sum())))
    rows = []
    for i, gain in zip(picked, gains):
        row = {"index": int(i), "information_bits": round(float(gain), 4)}
        if pool.records is not None:
            row.update(pool.records[i])
        rows.append(row)
    reason = ("the pool has no unanswered pair left" if not available.any() else
              "the basis holds one shared reward (rank 1): no answer can change w" if state.basis.rank == 1 else
              f"the best pair is expected to teach {math.floor(best * 1e4) / 1e4:.4f} bits, below {questions.STOP_BITS}"
              if stop else
              f"the best pair is expected to teach {best:.3f} bits")
    print(json.dumps({"answers": state.n_pairs, "pool": pool.size, "unanswered": int(available.sum()),
                      "stop": stop, "reason": reason, "selection_ms": round(selection_ms, 2), "questions": rows},
                     ensure_ascii=False))
    return 0


def _declare(args) -> int:
    directory = _directory(args)
    with state_lock(directory):
        state = load_state(directory)
        if args.clear:
            if args.attributes or args.priors is not None:
                raise ValueError("declare --clear removes every declared attribute; give it alone (without "
                                 "FIELD=VALUE or --priors)")
            if not state.attributes and state.prior_mean is None:  # a tester saw no word at all
                print("nothing to clear: no attribute is declared (the population prior is in use); the state is "
                      "unchanged", file=sys.stderr)  # and not written again (a tester saw its generation move)
                print(user_posterior.confidence(state, user_posterior.samples(state))["personalization"])
                return 0
            state = replace(state, attributes=(), prior_mean=None)
        else:
            if not args.attributes or args.priors is None:
                raise ValueError("declare needs FIELD=VALUE ... and --priors TABLE (or --clear)")
            declared = attribute_prior.parse_declarations(args.attributes)
            table = attribute_prior.read_table(args.priors, state.basis)
            mean, missing = attribute_prior.prior_mean(table, declared)
            if mean is None:  # a tester's typo (age=99) exited 0 and dropped the valid declaration made before it
                kept = "the earlier declarations stay" if state.attributes else "no prior is declared"
                raise ValueError(f"{args.priors} has no prior for {', '.join(missing)}: nothing changed ({kept}; "
                                 f"`declare --clear` removes declarations). {_table_rows(table, missing)}")
            if missing:  # each `declare` replaces the last: an earlier declaration does not stay in their place
                print(f"note: {args.priors} has no prior for {', '.join(missing)}: ignored; the rest are used. "
                      f"{_table_rows(table, missing)}", file=sys.stderr)
            used = tuple((field, value) for field, value in declared.items() if f"{field}={value}" not in missing)
            state = replace(state, attributes=used, prior_mean=mean)  # the declarations the prior was made of
        state, _ = user_posterior.refit(state)
        state = save_state(state)
    print(user_posterior.confidence(state, user_posterior.samples(state))["personalization"])
    return 0


def _table_rows(table: dict, missing: list[str]) -> str:
    """What a prior table holds for the fields of `missing` declarations (a typo shows; a tester saw only "ignored").
    A value it lacks may be a group too small to publish (the table's min_users)."""
    fields = dict.fromkeys(item.partition("=")[0] for item in missing)
    return "The table has " + "; ".join(
        f"{field}: {', '.join(sorted(table['groups'][field])) or 'no group'}" if field in table["groups"] else
        f"no field {field}" for field in fields) + " (groups smaller than its min_users are left out)"


def _strength(args) -> int:
    directory = _directory(args)
    with state_lock(directory):
        state = load_state(directory)
        if args.value is not None:
            state = save_state(replace(state, strength=personalize.parse_strength(args.value)))
    print("off" if state.strength is None else state.strength)
    return 0


def _status(args) -> int:
    state = load_state(_directory(args))
    confidence = user_posterior.confidence(state, user_posterior.samples(state))
    print(json.dumps({
        "state": str(state.directory), "generation": state.generation,
        "basis_version": state.basis.version, "embedder": state.basis.embedder,
        "rank": state.basis.rank, "dim": state.basis.dim, "encoder": state.encoder,
        "strength": "off" if state.strength is None else state.strength,
        "pairs": state.n_pairs, "adapted": state.user_weights is not None,
        **confidence, "personalization": _personalization_at(state, state.strength, confidence),
    }, ensure_ascii=False))
    return 0


def _personalization_at(state: DeviceState, strength: float | None, confidence: dict) -> str:
    """What personalizes the rewards at `strength`: at off or 0 the population reward, whatever the state has learned
    (a tester read "personal: learned from 6 answers" in `status` under `strength off`)."""
    if user_posterior.point_weights(state) is not None and not strength:
        mode = "off" if strength is None else strength
        return f"not applied at strength {mode}: the population reward (the state: {confidence['personalization']})"
    return confidence["personalization"]


def _forget(args) -> int:
    directory = _directory(args)
    leftovers = args.all and only_init_leftovers(directory)  # a killed `init`'s lock and temp files: removed too
    with state_lock(directory, create=leftovers):  # else refuses a directory that is not a device state
        notes, usable, had_personal_data = forget(directory, everything=args.all)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.all:
        print(f"deleted the device state in {directory}")
    else:  # a tester's second `forget` reported a deletion again, and read "the basis is kept" beside a note that
        # the rest of the state is unusable
        done = f"deleted all personal data in {directory}" if had_personal_data else \
            f"no personal data in {directory}: nothing to delete"
        print(f"{done}; " + ("the basis is kept (rankings use the population reward)" if usable else
                             "the rest of the state is unusable (see the note)"))
    return 0


def _export(args) -> int:
    from client.device.export import export_encoder
    from lore_core.atomic_io import check_output_path

    check_output_path(args.out, "--out", directory=True)  # before the model is loaded and traced

    out = export_encoder(args.out, args.model)
    print(f"exported the encoder to {out}")
    return 0


# --- helpers --------------------------------------------------------------------------------------------------


def _directory(args) -> Path:
    return Path(args.state) if args.state else default_state_dir()


def _state_source(args) -> str:
    """Where the state directory came from, as the user set it: for messages about it."""
    from client.device.state import STATE_HOME_ENV

    if args.state:
        return "--state"
    return f"${STATE_HOME_ENV}" if os.environ.get(STATE_HOME_ENV) else "the default state directory"


def _checked_encoder_dir(directory: Path, basis: BasisFile) -> tuple[str, dict]:
    """The encoder directory `init` sets (absolute) and the identity the state records for it."""
    from client.device.encoder import encoder_identity, read_encoder_meta

    meta = read_encoder_meta(directory, verify=True)
    _check_encoder_fits(directory, int(meta["dim"]), meta["embedder"], basis)
    _note_unnamed_basis(directory, basis)
    return str(Path(directory).resolve()), encoder_identity(meta)


def _note_unnamed_basis(directory, basis: BasisFile) -> None:
    """Say when a basis names no embedder (its pair file named none: a synthetic or older file), so the encoder set
    for it cannot be checked: a tester paired one with MiniLM and got meaningless scores without a word."""
    if basis.embedder in (None, UNKNOWN_EMBEDDER):
        warnings.warn(f"basis {basis.source} does not name the embedder it was trained on (its pair file named "
                      f"none), so whether the encoder {directory} gives its embeddings cannot be checked")


def _check_encoder_fits(directory, dim: int, embedder: str | None, basis: BasisFile) -> None:
    """Refuse an encoder whose embeddings are not the basis' space: another width, or another model (a named one
    whose embeddings the basis was not trained on would be scored without a word)."""
    from client.device.encoder import EncoderError

    if dim != basis.dim:
        raise EncoderError(f"{directory}: encoder dimension {dim} does not match the basis ({basis.dim})")
    if other_embedders(embedder, basis.embedder):
        raise EncoderError(f"{directory}: the encoder there is {embedder!r}, but basis {basis.source} was trained on "
                           f"embeddings of {basis.embedder!r}: its rewards would score another model's embeddings. "
                           "Export the basis' model there (`export-encoder --out DIR --model MODEL`), or give a basis "
                           "trained on this encoder's embeddings (with --reinit when the state exists)")


def _open_encoder(state: DeviceState, override: Path | None = None, *, basis: BasisFile | None = None):
    """The ONNX encoder a command embeds with, for `basis` (default: the state's): `override` (an --encoder given on
    the command line, for this call only), else the state's own, refused when its encoder.json no longer lists the
    files recorded then. Either way its files' checksums are verified (0.1 s beside the model's 0.3 s load): a
    tester overwrote part of the state's model.onnx after `init` and `rank` scored with it, exit 0."""
    from client.device.encoder import EncoderError, OnnxPairEncoder, encoder_identity, read_encoder_meta

    directory, basis = override or state.encoder, basis or state.basis
    if not directory:
        raise EncoderError("no encoder configured: pass --encoder DIR (from `export-encoder`) or set it at init")
    meta = read_encoder_meta(directory, verify=True)
    if not override and state.encoder_identity is not None:  # a state set before the record: not checked
        found = encoder_identity(meta)
        if found["sha256"] != state.encoder_identity["sha256"]:
            raise EncoderError(_replaced_encoder(state, found))
    _check_encoder_fits(directory, int(meta["dim"]), meta["embedder"], basis)  # before the model loads
    if override:
        _note_unnamed_basis(directory, basis)
    return OnnxPairEncoder(directory)  # its files were just verified


def _replaced_encoder(state: DeviceState, found: dict) -> str:
    """Why the state's own encoder is refused: another model was exported into its directory since it was set."""
    old, new = state.encoder_identity["embedder"] or "unnamed", found["embedder"] or "unnamed"
    directory = state.encoder
    return (f"{directory}: the encoder there was replaced since this device state was set up: it is now {new!r}, "
            f"the state was set up with {old!r}. The state's basis and its {state.n_pairs} stored choices belong to "
            "the old one: the new one would give wrong rewards, so nothing was done. Put the old model "
            f"back (`export-encoder --out {directory} --model MODEL`, MODEL the one {old!r} names) and record it "
            f"with `init --basis {state.basis.source} --encoder {directory}`; or move the state to the new model "
            f"with `init --reinit --basis FILE --encoder {directory}`, FILE a basis made for {new!r}; or pass "
            "`--encoder DIR` holding the old model, for one command")


def embed_choices(encoder, records: list[dict]) -> np.ndarray:
    """Pair diffs (n, D) = e(context, chosen) - e(context, rejected), both in one encoder call."""
    from lore_core.embeddings import render_context

    contexts = [render_context(personalize.choice_context(r)) for r in records]
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    emb = encoder.embed(contexts + contexts, responses)
    return emb[: len(records)] - emb[len(records):]


def _choice_diffs(path: Path, state: DeviceState, encoder_dir) -> tuple[np.ndarray, list[dict]]:
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(not_a_file("choices file", path))
        diff = personalize.read_choice_diffs(path, state.basis.dim)
        user = personalize.npz_user(path)  # checked against the stored choices' user as a text file's is (a tester)
        named = {} if user is None else {"user": user}
        return diff, [{"precomputed": f"{path.name}#{i}", **named} for i in range(len(diff))]
    records = personalize.read_choices(path)
    diff = embed_choices(_open_encoder(state, encoder_dir), records)
    tied = np.flatnonzero(personalize.tied_rows(diff))
    if tied.size:  # a tester's "Hello" against "hello ": the encoder sees one text, so the answer teaches nothing
        raise personalize.ChoicesError(
            f"{path}: choices {(tied + 1)[:5].tolist()} compare responses the encoder reads as the same text (their "
            "embeddings are equal: case and spacing are not seen); a choice is between two different responses")
    return diff, records


def _check_same_user(state: DeviceState, records: list[dict], path: Path) -> None:
    """Refuse choices whose `user` is not the one the state's stored choices name (a file of several users is
    refused when read; a reviewer: a second file of another user was learned)."""
    stored = {str(r["user"]) for r in map(json.loads, state.choices) if "user" in r}
    new = {str(r["user"]) for r in records if "user" in r}
    if stored and new and new != stored:
        raise personalize.ChoicesError(
            f"{path}: choices of user {', '.join(map(shown, sorted(new)))}, but the device state holds choices of "
            f"user {', '.join(map(shown, sorted(stored)))}; a device learns from its own user's choices only "
            "(`forget` first to start over for another user)")


def _not_yet_learned(state: DeviceState, diff: np.ndarray, records: list[dict]) -> np.ndarray:
    """(k,) bool: choices the state does not hold yet, each once (a choice the file repeats counts at its first
    occurrence, as a second run would skip it). Texts are compared by conversation, chosen and rejected
    (`personalize.choice_identity`); precomputed pairs by their diff row, exactly (`personalize.diff_identities`)."""
    stored = {personalize.choice_identity(r) for r in map(json.loads, state.choices) if "chosen" in r}
    precomputed = np.array(["precomputed" in r for r in records], dtype=bool)
    texts = [None if pre else personalize.choice_identity(r) for r, pre in zip(records, precomputed)]
    known = np.array([text in stored for text in texts], dtype=bool)
    rows = personalize.diff_identities(diff)
    if state.n_pairs:  # texts too: ones that differ only where the encoder does not look embed alike (a tester)
        known |= np.isin(rows, personalize.diff_identities(state.pair_diff))
    seen = set()
    for i, (text, row) in enumerate(zip(texts, rows)):  # a choice the file repeats: learned at its first occurrence
        keys = {row.tobytes()} | ({text} if text is not None else set())
        known[i] |= bool(keys & seen)
        seen |= keys
    return ~known


def _require_learning(state: DeviceState, consequence: str) -> None:
    """Refuse a command that serves learning when personalization is off (`strength off`: no personalization, no
    learning). A tester's `next-question` kept asking under `off` questions whose answers `adapt` refused."""
    if state.strength is None:
        raise StateError(f"personalization is off: {consequence}; turn it on with `strength 1` (or any value in "
                         "[0, 1])")


def _answered_the_other_way(state: DeviceState, diff: np.ndarray, records: list[dict]) -> int:
    """How many new choices pick the other response of a pair answered before, in the state or earlier in the same
    file (a tester read the second answer being kept as a duplicate that was missed; another saw no note for either
    one in a new file): texts by conversation and responses, precomputed pairs by a diff row that is exactly the
    negation of another. Exact repeats were skipped before, so any pair that matches unordered is the other way."""
    stored = {personalize.choice_identity(r, ordered=False) for r in map(json.loads, state.choices) if "chosen" in r}
    rows = personalize.diff_identities(diff, ordered=False)
    held = np.isin(rows, personalize.diff_identities(state.pair_diff, ordered=False)) if state.n_pairs else \
        np.zeros(len(rows), bool)  # texts too: ones the encoder reads alike give the negated row (a reviewer)
    earlier, flipped = set(), 0
    for record, row, in_state in zip(records, rows, held):
        keys = {row.tobytes()} | ({personalize.choice_identity(record, ordered=False)} if "chosen" in record else set())
        flipped += bool(in_state or keys & stored or keys & earlier)
        earlier |= keys
    return flipped


def _rebase(old: DeviceState, basis: BasisFile) -> DeviceState:
    """Adopt a new basis: keep the pairs if they live in the same embedding space, else re-embed the raw
    choices with `old`'s encoder (or drop them when that is impossible); w is refitted from scratch (old w is in old
    coordinates)."""
    # A state on a basis written before pair files named their embedder ("unknown") may adopt a named one of its
    # dimension without re-embedding (what every basis was assumed to be then); never the other way round: a named
    # space followed by an unnamed basis may be another model's.
    named_now = old.basis.embedder == UNKNOWN_EMBEDDER and basis.embedder != UNKNOWN_EMBEDDER
    both_named = UNKNOWN_EMBEDDER not in (old.basis.embedder, basis.embedder)
    same_named = both_named and not other_embedders(old.basis.embedder, basis.embedder)  # a model copied elsewhere
    same_space = old.basis.dim == basis.dim and (old.basis.embedder == basis.embedder or same_named or named_now)
    if same_space and named_now:
        print(f"note: the state's basis did not name its embedder; its stored choices are kept as embeddings of "
              f"{basis.embedder!r} ({basis.dim}-d)", file=sys.stderr)
    encoder = old.encoder if same_space else _check_rebase_keeps_choices(old, basis)
    identity = old.encoder_identity
    if encoder and not same_space and not old.n_pairs:
        # Nothing stored was embedded by the old model: the encoder kept for the new space is what it holds now
        from client.device.encoder import encoder_identity, read_encoder_meta

        identity = encoder_identity(read_encoder_meta(encoder))
    state = replace(old, basis=basis, encoder=encoder, encoder_identity=identity if encoder else None,
                    user_weights=None, posterior_mode=None, posterior_cov=None, prior_mean=None, attributes=())
    if old.attributes:
        print(_DROPPED_ATTRIBUTES)
    if not same_space and old.n_pairs:
        records = [json.loads(c) for c in old.choices]
        state = replace(state, pair_diff=embed_choices(_open_encoder(old, basis=basis), records).astype(np.float32))
    state, _ = user_posterior.refit(state)
    print(f"adopted basis v{basis.version} (was v{old.basis.version}); refitted w on {state.n_pairs} pairs")
    return state


def _check_rebase_keeps_choices(old: DeviceState, basis: BasisFile) -> str | None:
    """A basis of another embedding space is adopted only with an encoder of its dimension, and only if every
    stored choice can be re-embedded with it: nothing changes otherwise (the user's answers are never dropped as a
    side effect; `forget` drops them on purpose). With no stored choices an encoder that does not fit (or is gone)
    is simply not kept. Returns the encoder the new state keeps."""
    from client.device.encoder import EncoderError, read_encoder_meta

    encoder = old.encoder
    try:
        fits = not encoder or int(read_encoder_meta(encoder)["dim"]) == basis.dim
    except EncoderError:
        fits = False
    if not fits and not old.n_pairs:
        print(f"note: the encoder {encoder} does not fit the new basis ({basis.dim} dims) and is not kept; set one "
              "with `init --basis FILE --reinit --encoder DIR`", file=sys.stderr)
        return None
    if not fits:
        raise StateError(f"the device state's encoder {encoder} does not fit the new basis {basis.source} "
                         f"({basis.dim} dims), and {old.n_pairs} stored choices must be re-embedded with one: pass "
                         "--encoder DIR exported for the new basis' embedder")
    if not old.n_pairs:
        return encoder
    # precomputed pairs first: no encoder can re-embed them (a tester was told to pass --encoder for 38 of them)
    if not all("chosen" in json.loads(c) for c in old.choices):
        raise StateError(f"{old.n_pairs} stored choices include precomputed pairs without texts, which no encoder "
                         f"can re-embed for the new basis {basis.source}, of another embedder or width "
                         f"({basis.embedder!r}, {basis.dim} dims; the state's: {old.basis.embedder!r}, "
                         f"{old.basis.dim}); drop them first with `forget`, then `init --reinit`")
    if not encoder:
        raise StateError(f"the new basis {basis.source} is for another embedder ({basis.embedder!r}, {basis.dim} "
                         f"dims; the state's: {old.basis.embedder!r}, {old.basis.dim}); its {old.n_pairs} stored "
                         "choices must be re-embedded: pass --encoder DIR for the new embedder, or drop them first "
                         "with `forget`")
    return encoder


def _read_candidates(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(not_a_file("candidates file", path))
    with open(path, "rb") as file:
        zipped = file.read(4) == b"PK\x03\x04"
    if zipped:  # an .npz (a zip) read "line 1: not valid UTF-8" (a tester)
        raise ValueError(f"{path}: a zip archive such as an .npz; `rank` scores response texts (one per line, or a "
                         "JSON list of strings), which it embeds itself")
    text = read_text(path)
    first = text.lstrip().split("\n", 1)[0]
    labelled = re.match(r'\[[^\]"]*\]\s*\S', first)  # "[1] Save ten percent.": a text line opening with a label
    expected = "one response per line, or a JSON list of strings"
    if first.startswith("[") and not labelled:
        candidates = parse_json(text, path)
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise ValueError(f"{path}: a JSON candidates file must be a list of strings")
        blank = [number for number, candidate in enumerate(candidates, 1) if not candidate.strip()]
        if blank:  # a text file's blank lines are dropped; a blank string in a list is a mistake to name
            raise ValueError(f"{path}: candidates {blank[:5]} are blank; expected {expected} with text")
    else:
        # a tester: a JSON object (one line or pretty-printed), or JSONL records, were ranked as their raw text
        if _is_json_object(text.lstrip()) or _is_json_object(first):
            raise ValueError(f"{path}: expected {expected}, got JSON objects (`adapt` and `next-question` take those); "
                             "to rank responses that are themselves JSON, give a JSON list of strings")
        # lines end at "\n" (and "\r\n") only: str.splitlines also cut at U+2028, form feeds and U+0085 inside a
        # response, so a 4-line file gave 7 candidates whose indices no longer matched the app's (a tester)
        candidates = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not candidates:
        raise ValueError(f"{path}: no candidates")
    for number, candidate in enumerate(candidates, 1):
        if not personalize.is_unicode_text(candidate):
            raise ValueError(f"{path}: candidate {number} {personalize.NOT_UNICODE}")
    return candidates


def _is_json_object(text: str) -> bool:
    """Whether `text` (a candidates file, or its first line) is a JSON object: a JSON file or JSONL records."""
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
