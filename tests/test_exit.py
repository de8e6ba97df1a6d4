"""A command ends without the interpreter's teardown (``errors.exit_without_teardown``), yet exactly as a
normal exit would: the same status, every atexit handler and non-daemon thread finished, nothing printed
lost."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = """
import atexit, logging, sys, threading, time
from pathlib import Path
from initsearch.errors import exit_without_teardown

out = Path(sys.argv[1])

def late_thread():
    time.sleep(0.3)
    (out / "thread.txt").write_text("joined")

def main():
    threading.Thread(target=late_thread).start()  # not a daemon: a normal exit waits for it
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    handler = logging.FileHandler(out / "log.txt")  # buffered in the stream until logging's shutdown
    logging.getLogger("t").addHandler(handler)
    logging.getLogger("t").warning("logged")
    sys.stdout.write("printed without a newline")  # still in stdout's buffer (a pipe)
    return {result}

exit_without_teardown(main)
"""


def run(tmp_path: Path, result: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(PROGRAM.format(result=result)))
    return subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("result", "status", "stderr"), [
    ("None", 0, ""), ("0", 0, ""), ("3", 3, ""), ("sys.exit(4)", 4, ""), ("'bad input'", 1, "bad input"),
    ("sys.exit('stopped')", 1, "stopped"),
])
def test_same_status_and_every_exit_step(tmp_path: Path, result: str, status: int, stderr: str) -> None:
    proc = run(tmp_path, result)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "printed without a newline"
    assert proc.stderr.strip() == stderr
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "logged\n"


def test_an_idle_thread_pool_does_not_hang_the_exit(tmp_path: Path) -> None:
    """A live ``ThreadPoolExecutor`` (MLflow's artifact repositories keep one) has an idle non-daemon worker:
    a normal exit wakes it before joining, and so must this one."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent("""
        from concurrent.futures import ThreadPoolExecutor
        from initsearch.errors import exit_without_teardown

        POOL = ThreadPoolExecutor(1)

        def main():
            assert POOL.submit(lambda: 2).result() == 2
            print("done", end="")
            return 5

        exit_without_teardown(main)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (5, "done"), proc.stderr


def test_an_unexpected_exception_exits_as_python_does(tmp_path: Path) -> None:
    proc = run(tmp_path, "1 / 0")
    assert proc.returncode == 1
    assert "ZeroDivisionError" in proc.stderr and "Traceback" in proc.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"


SPY = """
import os, sys
_exit = os._exit

def spied_exit(code):
    if not sys.argv[0].endswith("writer.py"):  # (the MLflow writer a study starts ends through it too)
        open(os.environ["EXIT_SPY"], "a").write(f"{code}\\n")
    _exit(code)

os._exit = spied_exit
"""


def test_the_commands_end_through_it(tmp_path: Path) -> None:
    """``python -m initsearch``, ``initsearch.validate`` and ``initsearch.export`` end with ``os._exit``
    and their usual statuses (a help page 0, a bad override 2)."""
    import os

    (tmp_path / "sitecustomize.py").write_text(SPY)
    spy = tmp_path / "exits.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])]),
           "EXIT_SPY": str(spy)}
    commands = [(["-m", "initsearch", "--help"], 0), (["-m", "initsearch.validate", "--help"], 0),
                (["-m", "initsearch.export", "--help"], 0), (["-m", "initsearch", "n_trials=-1"], 2)]
    for args, status in commands:
        spy.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env=env)
        assert proc.returncode == status, (args, proc.stderr)
        assert spy.read_text() == f"{status}\n", args
