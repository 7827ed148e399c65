"""One live run per output folder, and training processes that stop when their launcher is gone."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from processes import gone, wait_for

from gqa_uptrain import locks
from gqa_uptrain.errors import OutputBusyError
from gqa_uptrain.train import run_lock

from .conftest import TINY_RECIPE, overrides, run_cli

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gqa_uptrain.train import run_lock
    with run_lock.taken(Path(sys.argv[1])):
        print("holding", flush=True)
        time.sleep(600)
""")


def test_a_second_holder_is_refused_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OutputBusyError) as refused, run_lock.taken(output):
            pass
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()}, started " in message
        assert str(output / run_lock.LOCK_FILE) in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases its flock; its content stays behind
        holder.wait()
    assert run_lock.holder(output)["pid"] == holder.pid

    with run_lock.taken(output):
        warning = capsys.readouterr().err.strip().splitlines()
        assert len(warning) == 1 and f"pid {holder.pid}" in warning[0] and "is gone; taking over" in warning[0]
        assert run_lock.holder(output)["pid"] == os.getpid()
    assert not (output / run_lock.LOCK_FILE).exists()
    with run_lock.taken(output):  # a clean release leaves nothing to warn about
        pass
    assert capsys.readouterr().err == ""


def test_without_flock_the_content_decides(tmp_path, monkeypatch, capsys):
    """On a file system that cannot flock: a holder on this host that is alive refuses, a dead one is taken over,
    one on another host is taken to be alive."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    output = tmp_path / "run"
    output.mkdir()
    lock = output / run_lock.LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": locks.process_start(os.getpid())}
    for record, busy in ((me, True), ({**me, "process_start": 1}, False), ({**me, "host": "elsewhere"}, True)):
        lock.write_text(json.dumps(record))
        if busy:
            with pytest.raises(OutputBusyError, match="is writing it now"), run_lock.taken(output):
                pass
        else:
            with run_lock.taken(output):
                pass
            assert "is gone; taking over" in capsys.readouterr().err


def test_parent_watch_stops_an_orphaned_worker(tmp_path):
    """A launcher-like parent starts a worker in a session of its own (as torchrun does) and is killed with -9:
    the worker, which watches its parent, ends within seconds."""
    parent_code = textwrap.dedent("""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                                  env={**os.environ, "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    worker_code = textwrap.dedent("""
        import time
        from gqa_uptrain.train.launcher import watch_launcher
        assert watch_launcher()
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code, worker_code], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the worker is up and watching
        assert not gone(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: gone(worker), 6, "the orphaned worker kept running")
    finally:
        if not gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_no_watch_without_a_launcher(monkeypatch):
    from gqa_uptrain.train import launcher

    for name in ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not launcher.launched_by_a_launcher()


@pytest.mark.slow
def test_a_live_run_refuses_a_second_and_dies_with_its_launcher(tmp_path, tiny_llama_gqa2, shakespeare, capsys):
    """torchrun starts a long run; a second run into the same folder is refused in one line naming it; killing
    torchrun alone (-9) stops the worker too; its lock is then stale and the next run takes it over."""
    output = tmp_path / "run"
    args = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=2000", "log.every=50",
                                         "checkpoint.every=1000", "eval.every=1000", "log.trackers=[]")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "-m", "gqa_uptrain.train", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    worker = None
    try:
        wait_for(lambda: (run_lock.holder(output) or {}).get("pid"), 120, "the run never took its lock")
        worker = run_lock.holder(output)["pid"]
        assert worker != launcher.pid

        second = run_cli(*args)
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"gqa-uptrain: error: output_dir {output}: gqa-uptrain "
                               f"(pid {worker} on {socket.gethostname()}, started ")
        assert "Traceback" not in second.stderr

        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        wait_for(lambda: gone(worker), 10, "the worker kept training after its launcher was killed")
    finally:
        for pid in (launcher.pid, worker):
            if pid and not gone(pid):
                os.kill(pid, signal.SIGKILL)

    capsys.readouterr()
    with run_lock.taken(output):
        pass
    assert f"pid {worker}" in capsys.readouterr().err  # the dead run's lock, taken over with a warning
