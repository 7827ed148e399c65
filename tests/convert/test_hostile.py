"""gqa-convert against hostile and damaged inputs: nothing lost, nothing let in.

The table holds every case as (what is prepared, the arguments after SOURCE -g 2, the exit code, the one line it
must print, what must hold afterwards). Below it: SIGKILL and SIGINT at seeded random points of a --force
replacement, a second writer while the first runs, and --force on a file system that cannot swap two folders.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.checkpoint_reader import read_safetensors_header
from gqa_uptrain.convert.cli import main
from gqa_uptrain.locks import output_lock
from gqa_uptrain.provenance import pretraining_record, write_provenance
from fault_cases import Case, refused_in_one_line
from mounts import small_tmpfs
from processes import wait_for
from tiny_models import random_model


@dataclass
class World:
    """tmp/models/tiny (the source, 4 KV heads) beside tmp/models/sibling; tmp/old, a model this tool converted
    (1 KV head); tmp/outside, a folder that is not the model's."""

    tmp: Path
    stack: ExitStack
    monkeypatch: pytest.MonkeyPatch
    source_files: dict[str, bytes] | None = None

    @property
    def source(self) -> Path:
        return self.tmp / "models" / "tiny"

    @property
    def old(self) -> Path:
        return self.tmp / "old"

    @property
    def outside(self) -> Path:
        return self.tmp / "outside"


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    with ExitStack() as stack:
        made = World(tmp_path, stack, monkeypatch)
        random_model("llama", kv_heads=4).save_pretrained(made.source)
        (made.tmp / "models" / "sibling").mkdir()
        (made.tmp / "models" / "sibling" / "keep.txt").write_text("a sibling's file")
        made.outside.mkdir()
        convert_checkpoint(made.source, 1, made.old, progress=False)
        made.source_files = tree(made.source)
        yield made


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as their target's bytes), to prove that nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kv_heads(model: Path) -> int | None:
    """The KV heads of a complete model folder, None when it is not one."""
    if not all((model / name).is_file() for name in ("config.json", "model.safetensors", "gqa_provenance.json")):
        return None
    return json.loads((model / "config.json").read_text())["num_key_value_heads"]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


# ---- preparations: each changes the world and returns the arguments after SOURCE -g 2 ----

def copy_tree(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name, data in tree(source).items():
        (target / name).write_bytes(data)
    return target


def home_that_looks_like_a_model(w: World) -> list:
    home = copy_tree(w.old, w.tmp / "home")  # even with a valid record, a home is never replaced
    w.monkeypatch.setenv("HOME", str(home))
    return ["-o", home, "--force"]


def folder_of_mine(w: World) -> list:
    (w.tmp / "mine").mkdir()
    (w.tmp / "mine" / "keep.txt").write_text("my notes")
    return ["-o", w.tmp / "mine", "--force"]


def pretrained_model(w: World) -> list:
    model = copy_tree(w.old, w.tmp / "pretrained")
    write_provenance(model, pretraining_record("scratch", tokens=1000, steps=10, data="text"))
    return ["-o", model, "--force"]


def corrupt_record(w: World) -> list:
    model = copy_tree(w.old, w.tmp / "corrupt")
    (model / "gqa_provenance.json").write_text('{"tool": {"name": "gqa-upt')
    return ["-o", model, "--force"]


def a_file(w: World) -> list:
    (w.tmp / "file.txt").write_text("a file")
    return ["-o", w.tmp / "file.txt", "--force"]


def link_to_model(w: World) -> list:
    (w.tmp / "link").symlink_to(w.old, target_is_directory=True)
    return ["-o", w.tmp / "link", "--force"]


def locked_by_another_run(w: World) -> list:
    w.stack.enter_context(output_lock(w.tmp / "new", "gqa-convert"))
    return ["-o", w.tmp / "new"]


def index_naming(shard: Callable[[World], str]) -> Callable[[World], list]:
    """An index beside the weights that sends every tensor to `shard(world)`, a copy of the weights outside."""
    def prepare(w: World) -> list:
        weights = w.source / "model.safetensors"
        (w.tmp / "models" / "stolen.safetensors").write_bytes(weights.read_bytes())
        names = read_safetensors_header(weights)
        (w.source / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {name: shard(w) for name in names}}))
        return ["-o", w.tmp / "new"]
    return prepare


def index_linked_out(w: World) -> list:
    """A valid index, moved outside and linked back."""
    argv = index_naming(lambda w: "model.safetensors")(w)
    index = w.source / "model.safetensors.index.json"
    index.rename(w.outside / index.name)
    index.symlink_to(w.outside / index.name)
    return argv


def link_out(name: str, folder: bool = False) -> Callable[[World], list]:
    """The source's `name` moved outside (or made there) and replaced by a link to it."""
    def prepare(w: World) -> list:
        target = w.outside / name
        if folder:
            target.mkdir()
            (target / "secret.txt").write_text("not for the model")
        elif (w.source / name).exists():
            (w.source / name).rename(target)
        else:
            target.write_text("not for the model")
        (w.source / name).symlink_to(target, target_is_directory=folder)
        return ["-o", w.tmp / "new"]
    return prepare


def fifo(w: World) -> list:
    os.mkfifo(w.source / "pipe")  # reading it would hang the conversion
    return ["-o", w.tmp / "new"]


def broken_link(w: World) -> list:
    (w.source / "gone.txt").symlink_to(w.source / "never-there.txt")
    return ["-o", w.tmp / "new"]


def killed_run_leftovers(w: World) -> list:
    partial = w.tmp / ".new.partial-k1lled00"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(bytes(1 << 20))
    (w.tmp / ".new.lock").write_text("gqa-convert (pid 999999 on a-dead-host)\n")  # its holder is gone
    return ["-o", w.tmp / "new"]


def no_locks_and_a_partial_folder(w: World) -> list:
    """A file system that cannot flock (Lustre without -o flock), and a partial folder that may be a live run's."""
    def cannot_lock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    w.monkeypatch.setattr("gqa_uptrain.locks.fcntl.flock", cannot_lock)
    return killed_run_leftovers(w)


def cut_between_renames(w: World) -> list:
    """--force on a file system that cannot swap, killed after it set the old output aside."""
    w.old.rename(w.tmp / ".old.old-cut00000")
    copy_tree(w.source, w.tmp / ".old.partial-cut00000")
    return ["-o", w.old, "--force"]


# ---- silent wrong results and tracebacks: sources that must be refused in one line ----

def edit_config(**values) -> Callable[[World], list]:
    def prepare(w: World) -> list:
        config = json.loads((w.source / "config.json").read_text())
        (w.source / "config.json").write_text(json.dumps({**config, **values}))
        return ["-o", w.tmp / "new"]
    return prepare


def edit_weights(change: Callable[[dict], dict]) -> Callable[[World], list]:
    """The source's weights rewritten by `change` (a dict of tensors in, a dict of tensors out)."""
    def prepare(w: World) -> list:
        from safetensors.torch import load_file, save_file
        weights = w.source / "model.safetensors"
        save_file(change(load_file(weights)), weights, metadata={"format": "pt"})
        return ["-o", w.tmp / "new"]
    return prepare


def with_fp8_scales(tensors: dict) -> dict:
    import torch
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("k_proj.weight"):
            out[name] = tensor.to(torch.float8_e4m3fn)
            out[name.replace(".weight", ".weight_scale")] = torch.ones(())
        else:
            out[name] = tensor
    return out


def with_int8_kv(tensors: dict) -> dict:
    import torch
    return {name: (t * 100).to(torch.int8) if name.endswith(("k_proj.weight", "v_proj.weight")) else t
            for name, t in tensors.items()}


def index_leaving_out_a_shard(w: World) -> list:
    """Two shards, and an index that names only the first one's tensors."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(w.source / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({n: tensors[n] for n in first}, w.source / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({n: tensors[n] for n in second}, w.source / "model-00002-of-00002.safetensors",
              metadata={"format": "pt"})
    (w.source / "model.safetensors").unlink()
    (w.source / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in first}}))
    return ["-o", w.tmp / "new"]


def header_with_offsets_not_a_list(w: World) -> list:
    weights = w.source / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"] = "0-16"
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])  # offsets are from the data
    return ["-o", w.tmp / "new"]


def calibrated(change: Callable[[dict], dict] | None = None) -> Callable[[World], list]:
    """--method calibrated on token ids that use token 5 in every sequence, after `change` to the source's weights."""
    def prepare(w: World) -> list:
        if change is not None:
            edit_weights(change)(w)
        rows = [{"input_ids": [5] + [3 + (i * 7 + s) % 90 for i in range(255)]} for s in range(8)]
        (w.tmp / "ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return ["-o", w.tmp / "new", "--method", "calibrated", "--calibration", w.tmp / "ids.jsonl",
                "--calibration-tokens", 1024]
    return prepare


def calibration_file(name: str, data: bytes) -> Callable[[World], list]:
    """--method calibrated on the file `name` holding `data`."""
    def prepare(w: World) -> list:
        (w.tmp / name).write_bytes(data)
        return ["-o", w.tmp / "new", "--method", "calibrated", "--calibration", w.tmp / name]
    return prepare


def id_rows(ids) -> Callable[[World], list]:
    return calibration_file("ids.jsonl", "".join(json.dumps({"input_ids": ids}) + "\n" for _ in range(8)).encode())


def nan_embedding_row(tensors: dict) -> dict:
    tensors["model.embed_tokens.weight"][5] = float("nan")
    return tensors


def overflowing_attention(tensors: dict) -> dict:
    """Finite weights whose attention logits overflow fp32 in layer 1 (about 1e42)."""
    for name in ("q_proj", "k_proj"):
        tensors[f"model.layers.1.self_attn.{name}.weight"] *= 1e21
    return tensors


def nan_refit(w: World) -> list:
    """The o_proj refit of every layer turns out NaN (a solver's failure, not the source's)."""
    import torch
    from gqa_uptrain.convert.calibration import fit
    w.monkeypatch.setattr(fit, "refit_output", lambda gram, cross, prior, *rest: torch.full_like(prior, torch.nan))
    return calibrated()(w)


def lock_of_kind(make: Callable[[Path], object]) -> Callable[[World], list]:
    """The output's lock file `.new.lock` made by `make` (a folder, a named pipe, a link)."""
    def prepare(w: World) -> list:
        make(w.tmp / ".new.lock")
        return ["-o", w.tmp / "new"]
    return prepare


def lock_left_alone(kind: Callable[[Path], bool]) -> Callable[[World], bool]:
    return lambda w: nothing_written(w) and kind(w.tmp / ".new.lock") and source_intact(w)


def index_with_a_list_weight_map(w: World) -> list:
    argv = index_naming(lambda w: "model.safetensors")(w)
    index = w.source / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": list(json.loads(index.read_text())["weight_map"])}))
    return argv


def little_memory(w: World) -> list:
    """1 MiB free where the calibration would run: 4,096 tokens of hidden size 64 need 3 MiB."""
    w.monkeypatch.setattr("gqa_uptrain.convert.plan._available_memory", lambda: (1 << 20, "available memory"))
    return ["-o", w.tmp / "new", "--method", "calibrated", "--calibration-tokens", 4096]


def source_intact(w: World) -> bool:
    return tree(w.source) == w.source_files and (w.tmp / "models" / "sibling" / "keep.txt").is_file()


def new_model(w: World) -> bool:
    return kv_heads(w.tmp / "new") == 2 and leftovers(w.tmp, "new") == [] and not (w.tmp / ".new.lock").exists()


def nothing_written(w: World) -> bool:
    return not os.path.lexists(w.tmp / "new") and leftovers(w.tmp, "new") == []


CASES = {
    # Nothing lost: what the output may be.
    "output is the source": Case(lambda w: ["-o", w.source, "--force"], 2,
                                 "the output must not be the source folder or inside it", source_intact),
    "output inside the source": Case(lambda w: ["-o", w.source / "sub", "--force"], 2,
                                     "the output must not be the source folder or inside it",
                                     lambda w: source_intact(w) and not (w.source / "sub").exists()),
    "output holds the source": Case(lambda w: ["-o", w.tmp / "models", "--force"], 2,
                                    "the output must not be a folder that holds the source", source_intact),
    "output two levels above the source": Case(lambda w: ["-o", w.tmp, "--force"], 2,
                                               "the output must not be a folder that holds the source",
                                               source_intact),
    "output is the root": Case(lambda w: ["-o", "/", "--force"], 2, "the output must not be", source_intact),
    "output is the home folder": Case(home_that_looks_like_a_model, 2,
                                      "the output must not be the filesystem root or a home folder",
                                      lambda w: kv_heads(w.tmp / "home") == 1),
    "output is a folder of mine": Case(folder_of_mine, 2, "has no gqa_provenance.json of its own",
                                       lambda w: tree(w.tmp / "mine") == {"keep.txt": b"my notes"}),
    "output is a pretrained model": Case(pretrained_model, 2, "records no conversion by gqa-uptrain",
                                         lambda w: kv_heads(w.tmp / "pretrained") == 1),
    "output has a corrupt record": Case(corrupt_record, 2, "gqa_provenance.json is not valid JSON",
                                        lambda w: kv_heads(w.tmp / "corrupt") == 1),
    "output is a file": Case(a_file, 2, "is a file, not a model folder",
                             lambda w: (w.tmp / "file.txt").read_text() == "a file"),
    "output is a link to a model": Case(link_to_model, 2, "is a link; name the folder itself",
                                        lambda w: kv_heads(w.old) == 1 and (w.tmp / "link").is_symlink()),
    "output exists, no --force": Case(lambda w: ["-o", w.old], 2, "already exists (use --force",
                                      lambda w: kv_heads(w.old) == 1),
    "output under a file": Case(lambda w: (a_file(w), ["-o", w.tmp / "file.txt" / "sub"])[1], 2,
                                "cannot create the output's folder", lambda w: (w.tmp / "file.txt").is_file()),
    "another run writes the output": Case(locked_by_another_run, 2, "is writing it now",
                                          lambda w: not (w.tmp / "new").exists()),
    # Nothing let in: what the source may name or link to.
    "index names ../": Case(index_naming(lambda w: "../stolen.safetensors"), 2,
                            "names the shard '../stolen.safetensors', which is not a file inside the model folder",
                            nothing_written),
    "index names an absolute path": Case(index_naming(lambda w: str(w.tmp / "models" / "stolen.safetensors")), 2,
                                         "which is not a file inside the model folder", nothing_written),
    "weights link out": Case(link_out("model.safetensors"), 2, "model.safetensors: it links to", nothing_written),
    "index links out": Case(index_linked_out, 2, "index.json: it links to", nothing_written),
    "config links out": Case(link_out("config.json"), 2, "config.json: it links to", nothing_written),
    "provenance links out": Case(link_out("gqa_provenance.json"), 2, "gqa_provenance.json: it links to",
                                 nothing_written),
    "a file links out": Case(link_out("notes.txt"), 0, "notes.txt not copied: it links to",
                             lambda w: new_model(w) and not (w.tmp / "new" / "notes.txt").exists()),
    "a folder links out": Case(link_out("extras", folder=True), 0, "extras not copied: it links to",
                               lambda w: new_model(w) and not (w.tmp / "new" / "extras").exists()),
    "a named pipe": Case(fifo, 0, "pipe not copied: it is not a regular file",
                         lambda w: new_model(w) and not (w.tmp / "new" / "pipe").exists()),
    "a broken link": Case(broken_link, 0, "gone.txt not copied: it is a broken link", new_model),
    # Silent wrong results: what cannot be converted exactly is refused.
    "a quantized config": Case(edit_config(quantization_config={"quant_method": "fp8"}), 2,
                               "a quantized checkpoint (fp8)", nothing_written),
    "fp8 weights with weight_scale": Case(edit_weights(with_fp8_scales), 2,
                                          "weight_scale: a quantized checkpoint (weights with scales)",
                                          nothing_written),
    "integer K/V weights": Case(edit_weights(with_int8_kv), 2, "is stored as int8; only 16- and 32-bit float",
                                nothing_written),
    "an index leaving out a shard": Case(index_leaving_out_a_shard, 2, "missing from the checkpoint, though the "
                                         "model has them", nothing_written),
    "a tensor left out": Case(edit_weights(lambda t: {n: v for n, v in t.items() if "layers.1.mlp.up" not in n}), 2,
                              "tensor(s) model.layers.1.mlp.up_proj.weight missing from the checkpoint",
                              nothing_written),
    # Silent wrong results of --method calibrated: a NaN in the source or in a fit stops it, naming where.
    "calibrated, NaN in an embedding row it reads": Case(
        calibrated(nan_embedding_row), 2, "source tensor model.embed_tokens.weight holds NaN or infinite values",
        nothing_written),
    "calibrated, attention that overflows fp32": Case(
        calibrated(overflowing_attention), 2, "calibrating model.layers.1: the statistics of the original attention "
        "on the calibration text are not finite", nothing_written),
    "calibrated, a fit that comes out NaN": Case(
        nan_refit, 2, "calibrating model.layers.0: the fitted attention weights are not finite", nothing_written),
    # Tracebacks where one line was promised.
    "calibration ids past the vocabulary": Case(id_rows([3, 96] * 64), 2, "ids.jsonl: token id 96 is outside the "
                                                "model's vocabulary of 96 ids (0-95)", nothing_written),
    "calibration ids negative": Case(id_rows([3, -1] * 64), 2, "token id -1 is outside the model's vocabulary",
                                     nothing_written),
    "calibration ids floats": Case(id_rows([3.0, 4.5] * 64), 2, "ids.jsonl: a row's 'input_ids' is not a list of "
                                   "integer token ids", nothing_written),
    "calibration ids null": Case(id_rows(None), 2, "a row's 'input_ids' is not a list of integer", nothing_written),
    "calibration ids strings": Case(id_rows(["3", "4"] * 64), 2, "a row's 'input_ids' is not a list of integer",
                                    nothing_written),
    "calibration text not UTF-8": Case(calibration_file("text.txt", b"plain words\nthen \xff\xfe bytes\n" * 40), 2,
                                       "text.txt: not UTF-8 text (byte offset 17: invalid start byte", nothing_written),
    "calibration lines not UTF-8": Case(calibration_file("rows.jsonl", b'{"text": "ok \xc3("}\n' * 40), 2,
                                        "rows.jsonl: not UTF-8 text (byte offset 13: invalid continuation", nothing_written),
    "a header with data_offsets not a list": Case(header_with_offsets_not_a_list, 2,
                                                  "corrupt safetensors header (tensor ", nothing_written),
    "num_key_value_heads a string": Case(edit_config(num_key_value_heads="4"), 2,
                                         "num_key_value_heads must be a whole number above 0, got '4'",
                                         nothing_written),
    "0 attention heads": Case(edit_config(num_attention_heads=0), 2,
                              "num_attention_heads must be a whole number above 0, got 0", nothing_written),
    "a config that is a list": Case(lambda w: ((w.source / "config.json").write_text("[1]"), ["-o", w.tmp / "new"])[1],
                                    2, "config.json: not a JSON object", nothing_written),
    # Locks of the wrong kind: one line, never followed, never removed.
    "the lock file is a folder": Case(lock_of_kind(Path.mkdir), 2, "new.lock: the lock file is a folder, so the "
                                      "output cannot be locked; remove it", lock_left_alone(Path.is_dir)),
    "the lock file is a named pipe": Case(lock_of_kind(os.mkfifo), 2, "new.lock: the lock file is a named pipe",
                                          lock_left_alone(lambda p: p.is_fifo())),
    "the lock file is a dangling link": Case(lock_of_kind(lambda p: p.symlink_to(p.parent / "victim")), 2,
                                             "new.lock: the lock file is a link", lambda w: lock_left_alone(
                                                 Path.is_symlink)(w) and not (w.tmp / "victim").exists()),
    # Numbers out of range, and an index of the wrong shape.
    "--seed 1e20": Case(lambda w: ["-o", w.tmp / "new", "--seed", "1e20"], 2, "--seed must be a whole number from 0 "
                        "to 4,294,967,295, got 100000000000000000000", nothing_written),
    "--calibration-tokens 1e20": Case(lambda w: ["-o", w.tmp / "new", "--method", "calibrated",
                                                 "--calibration-tokens", "1e20"], 2,
                                      "--calibration-tokens 100,000,000,000,000,000,000 needs about ", nothing_written),
    "--calibration-tokens beyond memory": Case(little_memory, 2, "--calibration-tokens 4,096 needs about 3.0 MiB for "
                                               "the hidden states (tokens x hidden size 64 x 4 bytes x 3), more than "
                                               "the 1.0 MiB of available memory here; use at most 1,365",
                                               nothing_written),
    "an index whose weight_map is a list": Case(index_with_a_list_weight_map, 2, "model.safetensors.index.json: not a "
                                                "valid checkpoint index (its weight_map is a list, not a mapping",
                                                nothing_written),
    # Leftovers of runs killed outright.
    "a killed run's partial folder": Case(killed_run_leftovers, 0, "left by an interrupted run", new_model),
    "a file system without locks": Case(no_locks_and_a_partial_folder, 0, "not removed without a lock",
                                        lambda w: kv_heads(w.tmp / "new") == 2 and (w.tmp / ".new.partial-k1lled00")
                                        .is_dir() and not (w.tmp / ".new.lock").exists()),
    "a --force cut between its renames": Case(cut_between_renames, 0, "put back from .old.old-cut00000",
                                              lambda w: kv_heads(w.old) == 2 and leftovers(w.tmp, "old") == []),
}


@pytest.mark.parametrize("name", CASES, ids=str)
def test_hostile_input(name, world, capsys):
    case = CASES[name]
    argv = [world.source, "-g", 2, *case.prepare(world)]
    capsys.readouterr()
    with pytest.raises(SystemExit) if case.code else ExitStack() as exit_info:
        main([str(a) for a in argv])
    if case.code:
        assert exit_info.value.code == case.code
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("gqa-convert: ")]
    if case.code:  # the error line is its only line: no warning beside it
        assert said == [refused_in_one_line("gqa-convert", err, case.line)], said
    else:  # done, the line a warning among its output
        assert len([line for line in said if case.line in line]) == 1, said
    assert case.holds(world)


def test_an_output_under_home_is_the_home(world, monkeypatch):
    """-o ~/new as a quoted argument or a script passes it: the home, never a folder named `~` here."""
    monkeypatch.setenv("HOME", str(world.tmp / "home"))
    monkeypatch.chdir(world.tmp)
    main([str(world.source), "-g", "2", "-o", "~/new"])
    assert kv_heads(world.tmp / "home" / "new") == 2 and not (world.tmp / "~").exists()


# ---- signals, and a second writer, against real processes ----

SLOW_CONVERT = """
import sys, time
from gqa_uptrain.convert import converter
from gqa_uptrain.convert.cli import main

def slow(function, seconds):
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)
    return slowed

converter.write_tensor = slow(converter.write_tensor, float(sys.argv[1]))
converter.flush_to_disk = slow(converter.flush_to_disk, float(sys.argv[1]))
main(sys.argv[2:])
"""


def start_slow_convert(seconds: float, *argv) -> subprocess.Popen:
    """gqa-convert in its own process, each pooled tensor and the final flush `seconds` slower."""
    return subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(seconds), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(process: subprocess.Popen, parent: Path, name: str) -> None:
    wait_for(lambda: list(parent.glob(f".{name}.partial-*")), 120, "the conversion never started writing", process)


@pytest.mark.parametrize("seed", [1, 5, 0, 2])
@pytest.mark.slow
def test_sigkill_at_a_random_point_of_force_keeps_old_or_new_and_the_next_run_cleans_up(seed, world, capsys):
    process = start_slow_convert(0.15, world.source, "-g", 2, "-o", world.old, "--force")
    wait_for_partial(process, world.tmp, "old")
    time.sleep(random.Random(seed).uniform(0, 0.9))  # 4 pooled tensors and the flush take about 0.75 s
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert kv_heads(world.old) in (1, 2)  # the old model or the new one, whole, at the instant of the kill
    left = leftovers(world.tmp, "old")
    main([str(world.source), "-g", "2", "-o", str(world.old), "--force"])
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gqa-convert: ")]
    assert len(said) == len(left) and all("left by an interrupted run" in line for line in said), (left, said)
    assert kv_heads(world.old) == 2 and leftovers(world.tmp, "old") == []


@pytest.mark.parametrize("seed", [1, 0])
@pytest.mark.slow
def test_sigint_at_a_random_point_of_force_keeps_old_or_new_and_leaves_nothing(seed, world):
    process = start_slow_convert(0.15, world.source, "-g", 2, "-o", world.old, "--force")
    wait_for_partial(process, world.tmp, "old")
    time.sleep(random.Random(seed).uniform(0, 0.9))
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()
    # 130: caught in the conversion; -SIGINT: it arrived as the interpreter was already exiting, the work done
    assert process.returncode in (0, 130, -signal.SIGINT), err
    if process.returncode == 130:
        assert err.strip().splitlines()[-1] == "gqa-convert: interrupted"
    assert kv_heads(world.old) in (1, 2) and leftovers(world.tmp, "old") == []


def test_a_second_writer_is_refused_while_the_first_lives_and_not_after_it_is_killed(world, capsys):
    first = start_slow_convert(60, world.source, "-g", 2, "-o", world.tmp / "new")
    try:
        wait_for_partial(first, world.tmp, "new")
        with pytest.raises(SystemExit):
            main([str(world.source), "-g", "1", "-o", str(world.tmp / "new")])
        said = capsys.readouterr().err.strip()
        assert said.startswith(f"gqa-convert: error: {world.tmp / 'new'}: gqa-convert (pid {first.pid} on "
                               f"{socket.gethostname()}, started ")
        assert said.endswith(f") is writing it now (lock {world.tmp / '.new.lock'}); wait for it to end, or choose "
                             "another output")
    finally:
        first.kill()
        first.wait()
    main([str(world.source), "-g", "1", "-o", str(world.tmp / "new")])  # its lock died with it
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gqa-convert: ")]
    assert len(said) == 1 and "left by an interrupted run" in said[0]
    assert kv_heads(world.tmp / "new") == 1 and leftovers(world.tmp, "new") == []


def test_ctrl_c_between_the_renames_of_force_without_a_swap_puts_the_old_model_back(world, monkeypatch, capsys):
    monkeypatch.setattr("gqa_uptrain.renames.exchange_paths", lambda first, second: False)
    rename = os.rename

    def interrupted_rename(source, target):
        if ".partial-" in os.fspath(source):  # the second rename: the new model into place
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    before = tree(world.old)
    with pytest.raises(SystemExit) as exit_info:
        main([str(world.source), "-g", "2", "-o", str(world.old), "--force"])
    assert exit_info.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "gqa-convert: interrupted"
    assert tree(world.old) == before and leftovers(world.tmp, "old") == []


def test_force_without_a_swap_still_replaces(world, monkeypatch):
    monkeypatch.setattr("gqa_uptrain.renames.exchange_paths", lambda first, second: False)
    main([str(world.source), "-g", "2", "-o", str(world.old), "--force"])
    assert kv_heads(world.old) == 2 and leftovers(world.tmp, "old") == []


# ---- a real full disk: a small tmpfs (root only) ----

@pytest.fixture
def small_disk(tmp_path):
    """An 80 MiB tmpfs: room for the tiny model and _check_space's 64 MiB margin, little more."""
    with small_tmpfs(tmp_path / "disk", "80m") as mount:
        yield mount


FILL_AFTER_CHECK = """
import shutil, sys
from gqa_uptrain.convert import converter
from gqa_uptrain.convert.cli import main

real_check = converter._check_space

def check_then_fill(plan, parent):
    real_check(plan, parent)  # room enough at the check; another program takes all but LEFT bytes right after
    with open(sys.argv[1], "wb") as filler:
        filler.write(bytes(shutil.disk_usage(parent).free - int(sys.argv[2])))

converter._check_space = check_then_fill
main(sys.argv[3:])
"""


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("gqa-convert: ")]
    assert len(said) == 1 and said[0].startswith("gqa-convert: error: "), done.stderr[-3000:]
    return said[0]


@pytest.mark.slow
def test_a_disk_too_small_is_refused_before_writing(world, small_disk):
    (small_disk / "other.bin").write_bytes(bytes(40 << 20))  # half the disk is someone else's
    done = subprocess.run([sys.executable, "-m", "gqa_uptrain.convert", str(world.source), "-g", "2",
                           "-o", str(small_disk / "new")], capture_output=True, text=True)
    line = one_error_line(done)
    assert f"{small_disk}: not enough free disk space (" in line and "; free " in line, line
    sizes = r"\(\d\d\.\d MiB free, the converted model needs 6\d\.\d MiB with a margin\); free \d\d\.\d MiB "
    assert re.search(sizes, line), line  # sizes a person can act on, never "0.0 GiB free, need 0.0 GiB"
    assert "or choose another output" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["other.bin"]


@pytest.mark.slow
def test_a_disk_that_fills_while_writing_says_what_to_free_and_keeps_nothing(world, small_disk):
    """Enough room at the start, then another program takes it: a real ENOSPC in the middle of the weights."""
    done = subprocess.run([sys.executable, "-c", FILL_AFTER_CHECK, str(small_disk / "filler"), str(64 << 10),
                           str(world.source), "-g", "2", "-o", str(small_disk / "new")], capture_output=True, text=True)
    line = one_error_line(done)
    assert line.startswith(f"gqa-convert: error: disk full while writing the converted model in {small_disk}, and "
                           "nothing of it was kept ("), line
    assert "free now, the model needs " in line and "; free " in line and "or choose another output" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no partial folder, no lock, no output
    (small_disk / "filler").unlink()  # space freed: the same command succeeds
    main([str(world.source), "-g", "2", "-o", str(small_disk / "new")])
    assert kv_heads(small_disk / "new") == 2 and sorted(p.name for p in small_disk.iterdir()) == ["new"]


@pytest.mark.parametrize("below, line", [
    ("new", "cannot write there (no permission, or a read-only file system)"),
    ("sub/new", "cannot create the output's folder (Read-only file system)"),
])
@pytest.mark.slow
def test_a_read_only_output_parent_is_one_line(world, tmp_path, below, line):
    with small_tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        done = subprocess.run([sys.executable, "-m", "gqa_uptrain.convert", str(world.source), "-g", "2",
                               "-o", str(mount / below)], capture_output=True, text=True)
        assert line in one_error_line(done)
        assert list(mount.iterdir()) == []
