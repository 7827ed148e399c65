"""The base's ways of putting an output in place: renames that never replace by accident, an atomic swap, the one
way a finished folder is put in place, and one lock per output that a dead holder does not keep."""

import errno
import json
import os
import socket

from pathlib import Path

import pytest
from gqa_uptrain import locks, renames as renames_module
from gqa_uptrain.errors import OutputBusyError, OutputError, is_full_disk
from gqa_uptrain.locks import lock_beside, output_lock
from gqa_uptrain.paths import check_output_folder, expand_home
from gqa_uptrain.renames import exchange_paths, move_into_place, rename_no_replace


@pytest.fixture(params=["renameat2", "portable"])
def renames(request, monkeypatch):
    """Each test runs with Linux's renameat2 and with the fallback for systems that lack it."""
    if request.param == "portable":
        monkeypatch.setattr(renames_module, "_renameat2", lambda source, target, flags: False)
    return request.param


def folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def test_rename_no_replace_never_replaces_even_an_empty_folder(tmp_path, renames):
    new = folder(tmp_path / "new", "new")
    (tmp_path / "taken").mkdir()  # os.rename would silently replace an empty folder
    with pytest.raises(FileExistsError):
        rename_no_replace(new, tmp_path / "taken")
    assert (new / "file.txt").read_text() == "new" and list((tmp_path / "taken").iterdir()) == []
    rename_no_replace(new, tmp_path / "free")
    assert (tmp_path / "free" / "file.txt").read_text() == "new" and not new.exists()


def test_exchange_swaps_two_folders_in_one_step_or_says_it_cannot(tmp_path, renames):
    first, second = folder(tmp_path / "first", "one"), folder(tmp_path / "second", "two")
    swapped = exchange_paths(first, second)
    assert swapped == (renames == "renameat2")
    expected = ("two", "one") if swapped else ("one", "two")
    assert ((first / "file.txt").read_text(), (second / "file.txt").read_text()) == expected


@pytest.mark.parametrize("exists", [False, True])
def test_a_finished_folder_is_fsynced_and_put_in_place_replacing_only_when_asked(tmp_path, renames, exists,
                                                                                  monkeypatch):
    synced = []
    monkeypatch.setattr(renames_module, "flush_to_disk", lambda paths: synced.extend(paths))
    work, output = folder(tmp_path / ".model.partial-abc", "new"), tmp_path / "model"
    if exists:
        folder(output, "old")
        with pytest.raises(FileExistsError):
            move_into_place(work, output, replace=False)
    move_into_place(work, output, replace=True)
    assert (output / "file.txt").read_text() == "new" and list(tmp_path.iterdir()) == [output]
    assert work / "file.txt" in synced


def test_a_real_failure_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "missing", folder(tmp_path / "there", "x"))


def test_the_lock_names_its_holder_and_refuses_a_second_one(tmp_path):
    output = tmp_path / "model"
    with output_lock(output, "gqa-convert") as held:
        assert held.flocked is True
        record = json.loads(lock_beside(output).read_text())
        assert (record["owner"], record["pid"], record["host"]) == ("gqa-convert", os.getpid(), socket.gethostname())
        holder = f"gqa-convert (pid {os.getpid()} on {socket.gethostname()}, started {record['started']})"
        with pytest.raises(OutputBusyError) as refused:
            with output_lock(output, "gqa-convert"):
                pass
        assert str(refused.value).startswith(f"{output}: {holder} is writing it now")
    assert not lock_beside(output).exists()


def test_a_lock_file_left_by_a_dead_process_blocks_nothing(tmp_path):
    output = tmp_path / "model"
    lock_beside(output).write_text("gqa-convert (pid 999999 on a-dead-host)\n")
    with output_lock(output, "gqa-publish"):
        assert json.loads(lock_beside(output).read_text())["owner"] == "gqa-publish"
    assert not lock_beside(output).exists()


def test_the_lock_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock_beside(tmp_path / "model").symlink_to(victim)
    with pytest.raises(OutputError, match=r"\.model\.lock: the lock file is a link, so the output cannot be locked"):
        with output_lock(tmp_path / "model", "gqa-convert"):
            pass
    assert victim.read_text() == "keep me" and lock_beside(tmp_path / "model").is_symlink()


# A lock file of the wrong kind: (how it is made, what the one line calls it). Never followed, never removed.
WRONG_LOCKS = {
    "a folder": (lambda path: path.mkdir(), "a folder"),
    "a named pipe": (os.mkfifo, "a named pipe"),  # opening it for reading alone would hang
    "a link to a folder": (lambda path: path.symlink_to(path.parent, target_is_directory=True), "a link"),
    "a dangling link": (lambda path: path.symlink_to(path.parent / "never-there"), "a link"),
}


@pytest.mark.parametrize("case", WRONG_LOCKS, ids=str)
def test_a_lock_file_of_the_wrong_kind_is_one_line_and_left_alone(case, tmp_path):
    make, kind = WRONG_LOCKS[case]
    lock = lock_beside(tmp_path / "model")
    make(lock)
    before = os.lstat(lock)
    with pytest.raises(OutputError) as refused:
        with output_lock(tmp_path / "model", "gqa-convert"):
            pass
    assert str(refused.value) == (f"{lock}: the lock file is {kind}, so the output cannot be locked; remove it (no gqa "
                                  "command makes one) and run the same command again")
    assert os.path.samestat(os.lstat(lock), before) and not (tmp_path / "never-there").exists()


# An output folder that cannot be one: (what is made in tmp, returning the output; the one line, {tmp} filled in).
def a_file(tmp: Path) -> Path:
    (tmp / "run").write_text("x")
    return tmp / "run"


def read_only(tmp: Path) -> Path:
    (tmp / "run").mkdir(mode=0o555)
    return tmp / "run"


WRONG_OUTPUTS = {
    "a file": (a_file, "output_dir {tmp}/run: is a file, not a folder; remove it or choose another output_dir"),
    "under a file": (lambda tmp: a_file(tmp) / "sub", "output_dir {tmp}/run/sub: {tmp}/run, above it, is a file, not "
                     "a folder"),
    "a dangling link": (lambda tmp: (tmp / "run").symlink_to(tmp / "gone") or tmp / "run",
                        "output_dir {tmp}/run is a link to {tmp}/gone, which does not exist; create that folder, or "
                        "remove the link or choose another output_dir"),
    "read-only": (read_only, "output_dir {tmp}/run cannot be written: no permission, or a read-only file system"),
}


@pytest.mark.parametrize("case", WRONG_OUTPUTS, ids=str)
def test_an_output_folder_that_cannot_be_one_is_one_line(case, tmp_path):
    make, line = WRONG_OUTPUTS[case]
    output = make(tmp_path)
    if case == "read-only" and os.access(output, os.W_OK):
        pytest.skip("root writes to a folder chmod'ed read-only (tests/apps/test_pipeline.py mounts a read-only one)")
    with pytest.raises(OutputError) as refused:
        check_output_folder(output, "output_dir")
    assert str(refused.value).startswith(line.format(tmp=tmp_path)), str(refused.value)


def test_a_link_to_a_folder_is_an_output_folder(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "disk", target_is_directory=True)
    check_output_folder(tmp_path / "run", "output_dir")
    check_output_folder(tmp_path / "new" / "run", "output_dir")  # made later, in a folder that can be written


def test_a_home_path_is_expanded_wherever_it_is_written(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert expand_home("~/runs/x") == "/home/someone/runs/x" and expand_home(Path("~")) == Path("/home/someone")
    assert expand_home("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf" and expand_home("a/~b") == "a/~b"


def test_a_file_system_that_cannot_lock_is_written_without_the_lock(tmp_path, monkeypatch):
    def cannot_lock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", cannot_lock)
    with output_lock(tmp_path / "model", "gqa-convert") as held:
        assert held.flocked is False and lock_beside(tmp_path / "model").is_file()
    assert not lock_beside(tmp_path / "model").exists()


def test_a_full_disk_is_a_full_file_system_or_a_quota_and_nothing_else():
    assert is_full_disk(OSError(errno.ENOSPC, "No space left on device"))
    assert is_full_disk(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_full_disk(OSError(errno.EACCES, "Permission denied"))
    assert not is_full_disk(RuntimeError("No space left on device"))  # a text alone is train/disk.py's business
