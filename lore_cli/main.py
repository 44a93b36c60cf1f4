"""The `lore-fed` command line: a thin dispatcher; each sub-command lives in its own module, imported lazily
so that `lore-fed --help` and light commands never pay for torch, transformers or Flower."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import warnings

# name -> (module, one-line help). Modules define `configure(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lore_cli.synth_command", "generate the PRISM-shaped benchmark population"),
    "prepare": ("lore_cli.prepare_command", "PRISM files -> pairs.jsonl, users.jsonl, summary.json"),
    "embed": ("lore_cli.embed_command", "pairs.jsonl -> pairs.npz (pair-embedding file)"),
    "train": ("lore_cli.train_command", "centralized LoRe training (the reference for federated runs)"),
    "evaluate": ("lore_cli.evaluate_command", "evaluate a saved basis on a pair file"),
    "simulate": ("lore_cli.simulate_command", "federated training through Flower's simulation engine"),
    "demo": ("lore_cli.demo_command", "the main job: benchmark -> embeddings -> federated -> report"),
    "privacy": ("lore_cli.privacy_command", "privacy accounting what-if questions"),
    "audit": ("lore_cli.audit_command", "privacy audits of a run"),
    "device": ("client.device.device_cli", "on-device personalization (same as python -m client.device)"),
    "deploy": ("lore_cli.deploy_command", "Flower Deployment Engine on this machine"),
}


class CommandFailed(RuntimeError):
    """A command that could not finish although its input was fine (e.g. a simulation whose workers died); the
    message says what happened and how to go on (usually: rerun the same command, it resumes). Exit code 1."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from lore_core import __version__

    parser = argparse.ArgumentParser(prog="lore-fed", description="Federated, private LoRe reward personalization")
    parser.add_argument("--version", action="version", version=f"lore-fed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)  # bare: exit 2, as `device`
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            module = importlib.import_module(module_name)
            module.configure(command_parser)
            command_parser.set_defaults(_run=module.run)
            if getattr(module, "INTERMIXED_ARGS", False):  # options may come between its positionals
                parser.set_defaults(_intermixed=command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while parsing, before a command ran (a tester's Ctrl-C at 0.2 s got a traceback)
        print("lore-fed: interrupted before the command started; nothing was done", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


def _main(argv: list[str]) -> int:
    from lore_core.atomic_io import empty_path_flag

    command = argv[0] if argv and argv[0] in COMMANDS else None
    if empty := empty_path_flag(argv):
        print(f"lore-fed {command or ''}: error: {empty} is empty or blank; give a path", file=sys.stderr)
        return 2
    try:
        parser = build_parser(only=command)
    except ModuleNotFoundError as exc:
        print(f"lore-fed {command}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    intermixed = parser.get_default("_intermixed")
    if intermixed:
        args = intermixed.parse_intermixed_args(argv[1:])
    else:  # an unrecognized argument gets the command's usage
        from lore_core.command_line import parse_command_line

        args = parse_command_line(parser, argv)
    args._command_line = "lore-fed " + shlex.join(str(a) for a in argv)  # as run, also in-process (`demo`'s runs)
    from lore_cli.termination import interrupted, is_interruption
    from lore_core.termination import terminated_as_interrupt
    from lore_core.run_lock import RunDirBusy

    try:
        with terminated_as_interrupt():
            code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is handled below
        return code
    except (ValueError, FileNotFoundError, RunDirBusy) as exc:
        # Bad input: a clear message, no traceback.
        print(f"lore-fed {command}: error: {_message(exc, args)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        from lore_core.closed_stdout import stdout_closed

        if not stdout_closed():  # a pipe other than stdout: a real failure
            raise
        return 141  # whoever read the output stopped (`| head`): no traceback, as other tools
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user gave: an internal failure keeps its traceback
        print(f"lore-fed {command}: error: {exc}", file=sys.stderr)  # permission denied, not a directory, disk full
        return 2
    except CommandFailed as exc:
        print(f"lore-fed {command}: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or kill -TERM (lore_cli.termination)
        if not is_interruption(exc):
            raise
        sub = getattr(args, "deploy_command", None)
        message, code = interrupted(f"{command} {sub}" if command == "deploy" and sub else command, exc)
        print(message, file=sys.stderr)
        return code


# Settings set by a flag of another name; every other setting NAME (a run-config key or a settings field) is set by
# --NAME with hyphens, where the command has that flag.
FLAG_OF_NAME = {"privacy-mode": "--privacy", "num-server-rounds": "--rounds", "population_size": "--population"}


def _message(exc: Exception, args: argparse.Namespace) -> str:
    """The message of bad input. A setting's error (lore_core.setting_names.SettingError: the run config's, shared by
    simulate, demo, deploy and the ServerApp; PrivacySettings'; synth's population; the embedder's) names settings
    by their own names; here they are written as this command's user types them: `-c key=value` where the command
    takes run-config overrides (deploy local), else the command's flag of that name (--eval-every 0), or "the default
    rank 5 (set --rank)" where the user did not give it, else the error's own name (a run-config key, a field)."""
    from lore_core.setting_names import NO_VALUE, SettingError, as_flags, as_option
    from server.run_settings import RunConfigError

    if not isinstance(exc, SettingError):
        return f"{exc}{getattr(exc, 'advice', '')}"  # a device state's repair (client.device.state)
    given = vars(args)
    if isinstance(exc, RunConfigError) and "run_config" in given:
        return exc.spelled(as_option("-c"))

    def flag_of(name: str) -> str | None:
        flag = FLAG_OF_NAME.get(name, f"--{name.replace('_', '-')}")
        return flag if flag[2:].replace("-", "_") in given else None

    def spelled(name: str, value=NO_VALUE) -> str:
        flag = flag_of(name)
        if flag is None:
            return exc.spelling(name, value)
        if value is not NO_VALUE and not isinstance(value, bool) and given[flag[2:].replace("-", "_")] is None:
            return f"the default {name} {json.dumps(value)} (set {flag})"  # not '--rank 5', which they never typed
        return as_flags(flag_of)(name, value)

    return exc.spelled(spelled)


def _format_warning(message, category, *_args, **_kwargs) -> str:
    """Warnings (solver non-convergence, weak privacy settings) as one line for users, without source lines."""
    return f"lore-fed: warning ({category.__name__}): {message}\n"


if __name__ == "__main__":
    # `python -m lore_cli.main` runs this file as `__main__`; the commands raise `lore_cli.main.CommandFailed`, a
    # class of the module imported under its own name, which `__main__.main` would not catch (a traceback, not exit 1).
    from lore_cli.main import main as imported_main

    sys.exit(imported_main())
