"""``neuron-serve``: the installed console script, argument errors, and ``prepare``'s exit statuses
and output with a fake pipeline (the real pipeline runs in the end-to-end tests)."""

from __future__ import annotations

import _thread
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prep_service.api import PrepareResult, PrepCancelled, PrepError, Progress
from shared import cli

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).with_name("neuron-serve")
if not EXE.exists():
    EXE = Path(shutil.which("neuron-serve") or EXE)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if not EXE.exists():
        pytest.fail(f"console script not installed at {EXE} (pip install -e .)")
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------ console script


def test_help_lists_the_commands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "prepare" in r.stdout and "prep-server" in r.stdout


def test_prepare_help_has_the_fixed_flags() -> None:
    r = run_cli("prepare", "--help")
    assert r.returncode == 0, r.stderr
    for flag in (
        "SOURCE",
        "--tp",
        "--dtype",
        "--output",
        "--revision",
        "--gqa-strategy",
        "--force",
        "--allow-pickle",
        "--name",
    ):
        assert flag in r.stdout, flag


def test_prep_server_help_has_the_fixed_flags() -> None:
    r = run_cli("prep-server", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--port", "--store", "--host", "--max-workers", "--metrics-port"):
        assert flag in r.stdout, flag


@pytest.mark.parametrize(
    "args",
    [
        (),  # no command
        ("no-such-command",),
        ("prepare",),  # SOURCE missing
        ("prepare", "src", "--tp", "two"),
        ("prepare", "src", "--dtype", "int4"),
        ("prepare", "src", "--gqa-strategy", "shuffle"),
        ("prepare", "src", "--bogus"),
        ("prep-server", "--port", "x"),
    ],
)
def test_argument_errors_exit_2(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""


def test_invalid_request_exits_2_before_running_anything() -> None:
    r = run_cli("prepare", "src", "--tp", "0")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip() == "error: tp_degree must be in [1, 128], got 0"


def test_exec_commands_are_optional() -> None:
    # A registered module that is absent is skipped; a present one is imported.
    assert not cli._module_exists("exec_service.no_such_module")
    assert not cli._module_exists("no_such_package.cli")
    assert cli._module_exists("prep_service.cli")


# ------------------------------------------------- prepare with a fake pipeline


def _fake_convert(monkeypatch, prepare) -> None:
    module = types.ModuleType("prep_service.convert")
    module.prepare = prepare
    monkeypatch.setitem(sys.modules, "prep_service.convert", module)


def test_prepare_success_prints_manifest_uri_last(monkeypatch, capsys) -> None:
    seen = {}

    def prepare(req, *, progress=None, cancel=None):
        seen["req"] = req
        progress(Progress("download", bytes_done=10, bytes_total=100))
        progress(Progress("download", bytes_done=100, bytes_total=100))
        progress(Progress("convert", tensors_done=1, tensors_total=3))
        progress(Progress("convert", tensors_done=3, tensors_total=3))
        return PrepareResult("file:///s/models/m/k/manifest.json", "k", reused=False)

    _fake_convert(monkeypatch, prepare)
    rc = cli.main(
        ["prepare", "org/model", "--tp", "4", "--dtype", "bfloat16", "--output", "file:///s", "--revision", "main",
         "--gqa-strategy", "convert_to_mha", "--force", "--allow-pickle", "--name", "m"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.splitlines()[-1] == "file:///s/models/m/k/manifest.json"
    req = seen["req"]
    assert (req.source, req.tp_degree, req.dtype, req.output, req.revision) == (
        "org/model",
        4,
        "bfloat16",
        "file:///s",
        "main",
    )
    assert (req.gqa_strategy, req.force, req.allow_pickle, req.name) == ("convert_to_mha", True, True, "m")
    # stderr is not a terminal here: one concise line per stage change, no progress bar.
    stage_lines = [line for line in err.splitlines() if line.startswith("prepare: ")]
    assert [line.split()[1] for line in stage_lines] == ["download", "convert"]
    assert "\r" not in err


def test_prepare_defaults(monkeypatch, capsys) -> None:
    seen = {}

    def prepare(req, *, progress=None, cancel=None):
        seen["req"] = req
        return PrepareResult("file:///d/manifest.json", "k", reused=True)

    _fake_convert(monkeypatch, prepare)
    assert cli.main(["prepare", "org/model"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "file:///d/manifest.json"
    assert "reused" in err
    req = seen["req"]
    assert (req.tp_degree, req.dtype, req.output, req.revision, req.gqa_strategy, req.force) == (
        1,
        "float32",
        None,
        None,
        None,
        False,
    )


def test_prepare_prep_error_exits_2(monkeypatch, capsys) -> None:
    def prepare(req, *, progress=None, cancel=None):
        raise PrepError("model-00001.safetensors: tensor 'lm_head.weight' has dtype int8")

    _fake_convert(monkeypatch, prepare)
    assert cli.main(["prepare", "org/model"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err.strip().splitlines()[-1]
        == "error: model-00001.safetensors: tensor 'lm_head.weight' has dtype int8"
    )


def test_prepare_unexpected_error_exits_1(monkeypatch, capsys) -> None:
    def prepare(req, *, progress=None, cancel=None):
        raise RuntimeError("disk on fire")

    _fake_convert(monkeypatch, prepare)
    assert cli.main(["prepare", "org/model"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "error: unexpected RuntimeError: disk on fire" in err
    assert "Traceback" in err


@pytest.fixture
def sigint_default():
    """Ctrl-C as in a terminal: a shell without job control (``cmd &`` in a script) starts its
    children with SIGINT ignored, and Python then keeps it ignored; these tests need it delivered."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_prepare_ctrl_c_cancels_and_exits_130(monkeypatch, capsys, sigint_default) -> None:
    cancelled = threading.Event()

    def prepare(req, *, progress=None, cancel=None):
        progress(Progress("convert"))
        _thread.interrupt_main()  # Ctrl-C, delivered to the main thread as KeyboardInterrupt
        if not cancel.wait(10):
            raise AssertionError("cancel was not set")
        cancelled.set()
        raise PrepCancelled()

    _fake_convert(monkeypatch, prepare)
    assert cli.main(["prepare", "org/model"]) == 130
    out, err = capsys.readouterr()
    assert cancelled.is_set()
    assert out == ""
    assert "cancelled: nothing was published" in err


# ---------------------------------------- real signals, in a subprocess with a fake pipeline

_FAKE_PIPELINE = textwrap.dedent(
    """
    import sys, types
    from prep_service.api import PrepCancelled, Progress

    def prepare(req, *, progress=None, cancel=None):
        progress(Progress("convert"))
        print("fake: started", file=sys.stderr, flush=True)
        if not cancel.wait(30):
            sys.exit(99)
        print("fake: cancel seen", file=sys.stderr, flush=True)
        raise PrepCancelled()

    m = types.ModuleType("prep_service.convert")
    m.prepare = prepare
    sys.modules["prep_service.convert"] = m
    from shared.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _FAKE_PIPELINE, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal delivers it, even when this run inherited it ignored (see sigint_default)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _read_stderr_until(proc: subprocess.Popen, pattern: str, timeout: float = 30) -> re.Match:
    lines: list[str] = []
    found: list[re.Match] = []

    def reader() -> None:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(pattern, line)
            if m:
                found.append(m)
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not found:
        proc.kill()
        raise AssertionError(f"{pattern!r} not seen on stderr: {''.join(lines)}")
    return found[0]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_prepare_signal_cancels(sig: signal.Signals, code: int) -> None:
    proc = _spawn("prepare", "org/model")
    try:
        _read_stderr_until(proc, "fake: started")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert out == ""
    assert "fake: cancel seen" in err and "nothing was published" in err


def test_prep_server_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    proc = _spawn("prep-server", "--port", "0", "--store", tmp_path.as_uri(), "--grace-period", "5")
    try:
        port = int(_read_stderr_until(proc, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "neuronserve.prep.v1.PrepService"):
                r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "draining" in err and "prep server stopped" in err


def test_progress_bar_on_a_terminal() -> None:
    import io

    from prep_service.progress import ProgressPrinter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    reporter = ProgressPrinter(stream)
    reporter(Progress("download", bytes_done=512, bytes_total=2048))
    reporter(Progress("convert", bytes_done=2048, bytes_total=2048, tensors_done=3, tensors_total=4))
    reporter.close()
    text = stream.getvalue()
    assert "\r" in text  # a redrawn bar, not log lines
    assert "download" in text and "convert" in text and "tensors 3/4" in text
    assert "prepare: " not in text
