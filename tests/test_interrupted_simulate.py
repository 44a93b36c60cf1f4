"""Ctrl-C (or kill -TERM) during `lore-fed simulate` ends the process with exit 130 (143), its run directory unlocked
and resumable.

Flower's simulation engine runs the ServerApp in a thread that is not a daemon; a Ctrl-C stops only the engine, in
the main thread (server/engine_stop.py). The command runs in a subprocess, with Flower's engine, ServerApp and
ClientApp all real but the nodes served in-process instead of by Ray actors, so that it starts in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lore_core.pairs import save_pairs
from server.checkpoint import load_checkpoint
from server.engine_stop import ServerAppStopped, engine_in_this_process, stopping_with_engine
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 100  # many more than pass before the signal lands, even on a fast idle machine
EXIT_SECONDS = 15  # a hang fails here instead of blocking the suite

# `python -c` driver: the CLI with Flower's engine on an in-process backend; SIGINT raises KeyboardInterrupt as in a
# terminal (a shell running the tests in the background may have left it ignored).
LORE_FED_WITHOUT_RAY = """
import signal, sys
from flwr.server.superlink.fleet.vce.backend import Backend, raybackend

class InProcessBackend(Backend):
    def build(self, app_fn):
        self.app = app_fn()

    @property
    def num_workers(self):
        return 1

    def is_worker_idle(self):
        return True

    def terminate(self):
        pass

    def process_message(self, message, context):
        return self.app(message=message, context=context), context

raybackend.RayBackend = InProcessBackend  # what the engine instantiates
signal.signal(signal.SIGINT, signal.default_int_handler)
from lore_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def lore_fed(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.Popen([sys.executable, "-c", LORE_FED_WITHOUT_RAY, *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen, seconds: float) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"lore-fed simulate still running {seconds} s later") from None
    return proc.returncode, out + err


@pytest.mark.parametrize("sig, exit_code, said", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_during_simulate_exits_unlocked_and_the_same_command_resumes(tmp_path, sig, exit_code,
                                                                                      said):
    """SIGTERM, found by a tester: Ray's handler ended the process with exit 15 and no word (the driver below has no
    Ray; `test_ray_s_sigterm_exit_reads_as_sigterm` covers Ray's handler)."""
    pairs = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=6, unseen_users=2,
                                                      train_pairs=(8, 10), few_shot_pairs=3, test_pairs=4, seed=2))[0]
    run = tmp_path / "run"
    argv = ["simulate", str(save_pairs(pairs, tmp_path / "pairs.npz")), "--out", str(run), "--rounds", str(ROUNDS),
            "--clients-per-round", "3", "--rank", "2", "--privacy", "none", "--eval-every", "0"]
    first = lore_fed(*argv)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.npz").exists():  # a round has finished: the run is under way
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no round finished in 120 s"
            time.sleep(0.1)
        first.send_signal(sig)
        code, output = finished(first, EXIT_SECONDS)
    finally:
        first.kill()
    assert code == exit_code, output
    assert said in output and "resumes after the last round" in output and "Traceback" not in output
    interrupted_at = load_checkpoint(run).round  # the last finished round's checkpoint, intact
    assert 1 <= interrupted_at < ROUNDS

    code, output = finished(lore_fed(*argv), 120)  # the lock was released: the same command is not refused
    assert code == 0, output
    assert f"resuming after round {interrupted_at}" in output
    assert json.loads((run / "metrics.json").read_text())["rounds"] == ROUNDS


def ray_processes_in_group(pgid: int) -> list[str]:
    """Names of the Ray daemons and workers (raylet, gcs_server, ray::...) whose process group is `pgid`."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and ("raylet" in name or "gcs_server" in name or name.startswith("ray::")):
            names.append(name)
    return names


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigterm_to_simulate_s_whole_process_group_exits_143_with_ray_s_processes_outside_it(tmp_path):
    """Found by a tester: `timeout --preserve-status` or `kill -TERM -PGID` also reached Ray's daemons, which share the
    command's process group; Ray then aborted the command (exit 134, signal 6) before its SIGTERM handler ran. Ray's
    daemons now start in a session of their own (simulations/flower_run.py). Real Ray, in the command's own group."""
    pairs = make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=6, unseen_users=2,
                                                      train_pairs=(8, 10), few_shot_pairs=3, test_pairs=4, seed=2))[0]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    command = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lore_cli.main import main; sys.exit(main(sys.argv[1:]))",
         "simulate", str(save_pairs(pairs, tmp_path / "pairs.npz")), "--out", str(run), "--rounds", "2000",
         "--clients-per-round", "3", "--rank", "2", "--privacy", "none", "--eval-every", "0"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoint.npz").exists():  # Ray is up and a round has finished
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "no round finished in 180 s"
            time.sleep(0.2)
        in_group = ray_processes_in_group(command.pid)
        os.killpg(command.pid, signal.SIGTERM)
        code, output = finished(command, 60)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
    assert in_group == []
    # The command stopped the run itself, and says so. Exit 143; under heavy load Ray has, rarely, still aborted while
    # the process exited after saying so (-6, seen once in a CI run; README), a race of its own, not of the group.
    assert code in (143, -signal.SIGABRT), output
    assert "terminated (SIGTERM)" in output and "resumes after the last round" in output
    assert 1 <= load_checkpoint(run).round < 2000


def test_a_server_app_still_loading_when_the_engine_stopped_stops_at_its_first_request():
    grid, loaded, outcome = object(), threading.Event(), []

    def server_app():
        loaded.wait()
        try:
            stopping_with_engine(grid).get_node_ids()
        except ServerAppStopped:
            outcome.append("stopped")

    with engine_in_this_process():
        late = threading.Thread(target=server_app)
        late.start()
    loaded.set()
    late.join(5)
    assert outcome == ["stopped"]
    assert stopping_with_engine(grid) is grid  # a ServerApp that no engine started keeps its grid


def test_ray_s_sigterm_exit_reads_as_sigterm():
    """`ray.init` replaces lore-fed's SIGTERM handler with one that calls sys.exit(15): that exit is reported as a
    kill -TERM (143, the rerun sentence), any other exit passes through."""
    from lore_cli.termination import interrupted, is_interruption

    assert is_interruption(SystemExit(signal.SIGTERM)) and not is_interruption(SystemExit(2))
    message, code = interrupted("simulate", SystemExit(signal.SIGTERM))
    assert code == 143 and "terminated (SIGTERM)" in message
    assert interrupted("train", KeyboardInterrupt())[1] == 130
    assert "starts over" in interrupted("train", KeyboardInterrupt())[0]


def test_interruptions_held_during_writes_that_belong_together_act_after_them(ctrl_c_raises):
    """A reviewer of `interruptions_deferred`: Ctrl-C or SIGTERM during the block acts after it (SIGTERM first when
    both came), an error of the block itself is not hidden by a held signal, and the handlers are restored."""
    import signal

    from lore_core.termination import Terminated, interruptions_deferred, terminated_as_interrupt

    before = signal.getsignal(signal.SIGINT)
    done = []
    with terminated_as_interrupt():
        with pytest.raises(Terminated):
            with interruptions_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                done.append("written")
        assert done == ["written"]
        with pytest.raises(OSError, match="disk full"):
            with interruptions_deferred():
                signal.raise_signal(signal.SIGINT)
                raise OSError("disk full")
        with pytest.raises(KeyboardInterrupt):
            with interruptions_deferred():
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # terminated_as_interrupt's, back
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_inside_an_extension_s_import_ends_as_the_signal_not_an_import_error():
    """A tester's `kill -TERM` while onnxruntime was being imported: the Terminated came wrapped in "ImportError:
    initialization failed", a traceback and exit 1 instead of the interrupted command's 143."""
    import signal

    from lore_core.termination import Terminated, terminated_as_interrupt

    def import_interrupted_by_sigterm():
        try:
            signal.raise_signal(signal.SIGTERM)  # arrives while the extension initializes
        except Terminated as exc:
            raise ImportError("initialization failed") from exc

    with pytest.raises(Terminated):
        with terminated_as_interrupt():
            import_interrupted_by_sigterm()
    with pytest.raises(ImportError, match="no module"):  # an import error of its own stays one
        with terminated_as_interrupt():
            raise ImportError("no module named onnxruntime")
    with pytest.raises(ImportError, match="real"):  # one raised while handling an interruption, not caused by it
        with terminated_as_interrupt():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise ImportError("a real failure") from None
