"""The base's ways of putting an output in place: renames that never replace by accident, an atomic swap, and one
lock per output that a dead holder does not keep."""

import errno
import json
import os
import socket

import pytest
from gqa_uptrain import files, locks
from gqa_uptrain.errors import OutputBusyError
from gqa_uptrain.files import exchange_paths, is_full_disk, lock_path, output_lock, rename_no_replace


@pytest.fixture(params=["renameat2", "portable"])
def renames(request, monkeypatch):
    """Each test runs with Linux's renameat2 and with the fallback for systems that lack it."""
    if request.param == "portable":
        monkeypatch.setattr(files, "_renameat2", lambda source, target, flags: False)
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


def test_a_real_failure_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "missing", folder(tmp_path / "there", "x"))


def test_the_lock_names_its_holder_and_refuses_a_second_one(tmp_path):
    output = tmp_path / "model"
    with output_lock(output, "gqa-convert") as held:
        assert held is True
        record = json.loads(lock_path(output).read_text())
        assert (record["owner"], record["pid"], record["host"]) == ("gqa-convert", os.getpid(), socket.gethostname())
        holder = f"gqa-convert (pid {os.getpid()} on {socket.gethostname()})"
        with pytest.raises(OutputBusyError) as refused:
            with output_lock(output, "gqa-convert"):
                pass
        assert str(refused.value).startswith(f"{output}: {holder} is writing it now")
    assert not lock_path(output).exists()


def test_a_lock_file_left_by_a_dead_process_blocks_nothing(tmp_path):
    output = tmp_path / "model"
    lock_path(output).write_text("gqa-convert (pid 999999 on a-dead-host)\n")
    with output_lock(output, "gqa-publish"):
        assert json.loads(lock_path(output).read_text())["owner"] == "gqa-publish"
    assert not lock_path(output).exists()


def test_the_lock_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock_path(tmp_path / "model").symlink_to(victim)
    with pytest.raises(OSError):
        with output_lock(tmp_path / "model", "gqa-convert"):
            pass
    assert victim.read_text() == "keep me"


def test_a_file_system_that_cannot_lock_is_written_without_the_lock(tmp_path, monkeypatch):
    def cannot_lock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", cannot_lock)
    with output_lock(tmp_path / "model", "gqa-convert") as held:
        assert held is False and lock_path(tmp_path / "model").is_file()
    assert not lock_path(tmp_path / "model").exists()


def test_a_full_disk_is_a_full_file_system_or_a_quota_and_nothing_else():
    assert is_full_disk(OSError(errno.ENOSPC, "No space left on device"))
    assert is_full_disk(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_full_disk(OSError(errno.EACCES, "Permission denied"))
    assert not is_full_disk(RuntimeError("No space left on device"))  # a text alone is train/disk.py's business
