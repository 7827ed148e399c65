"""The link rule of gqa_uptrain.model_folder, as a table: what a model folder may show, and why the rest stays out."""

import os

import pytest

from gqa_uptrain.errors import CheckpointError
from gqa_uptrain.model_folder import model_files, model_root, readable_files

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path):
    """A Hugging Face cache: models--org--tiny/snapshots/<rev>/ links into models--org--tiny/blobs/, and one link
    into another repository's blobs; beside it a folder outside every model."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--other" / "blobs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    snapshot = repo / "snapshots" / REVISION
    (snapshot / "sub").mkdir(parents=True)
    for name, blob in [("config.json", "aaa"), ("sub/tokenizer.json", "bbb")]:
        (repo / "blobs" / blob).write_text(name)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / blob, (snapshot / name).parent))
    (tmp_path / "hub" / "models--org--other" / "blobs" / "ccc").write_text("another model's file")
    (snapshot / "borrowed.txt").symlink_to(tmp_path / "hub" / "models--org--other" / "blobs" / "ccc")
    return snapshot


# name -> (how it is made in a plain model folder, whether it may be read, the reason otherwise)
ENTRIES = {
    "plain.txt": (lambda f, out: (f / "plain.txt").write_text("x"), None),
    "inside-link.txt": (lambda f, out: (f / "inside-link.txt").symlink_to("plain.txt"), None),
    "outside-link.txt": (lambda f, out: (f / "outside-link.txt").symlink_to(out / "secret.txt"),
                         "links to {out}/secret.txt, outside the model folder"),
    "dotdot-link.txt": (lambda f, out: (f / "dotdot-link.txt").symlink_to("../outside/secret.txt"),
                        "links to {out}/secret.txt, outside the model folder"),
    "absolute-link": (lambda f, out: (f / "absolute-link").symlink_to(out.resolve() / "secret.txt"),
                      "links to {out}/secret.txt, outside the model folder"),
    "folder-link": (lambda f, out: (f / "folder-link").symlink_to("sub", target_is_directory=True),
                    "it links to a folder, and linked folders are not followed"),
    "broken": (lambda f, out: (f / "broken").symlink_to("nowhere"), "it is a broken link"),
    "pipe": (lambda f, out: os.mkfifo(f / "pipe"), "it is not a regular file"),
    "sub/nested.txt": (lambda f, out: (f / "sub" / "nested.txt").write_text("x"), None),
}


def test_what_a_plain_folder_may_show(tmp_path):
    model, outside = tmp_path / "model", tmp_path / "outside"
    (model / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    for make, _ in ENTRIES.values():
        make(model, outside)
    (model / ".hidden").write_text("never listed")
    found = model_files(model)
    assert found.files == sorted(name for name, (_, reason) in ENTRIES.items() if reason is None)
    assert set(found.left_out) == {name for name, (_, reason) in ENTRIES.items() if reason is not None}
    for name, (_, reason) in ENTRIES.items():
        if reason is not None:
            assert reason.format(out=outside.resolve()) in found.left_out[name], name


def test_a_hub_snapshot_may_read_its_own_blobs_and_nothing_else(hub):
    assert model_root(hub) == hub.parent.parent
    found = model_files(hub)
    assert found.files == ["config.json", "sub/tokenizer.json"]
    assert list(found.left_out) == ["borrowed.txt"] and "outside the model folder" in found.left_out["borrowed.txt"]


def test_an_essential_file_that_breaks_the_rule_refuses_the_folder(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "model" / "notes.txt").symlink_to(tmp_path / "secret.txt")
    assert readable_files(tmp_path / "model", lambda name: False, "gqa-test", "copied") == []
    assert capsys.readouterr().err == (f"gqa-test: warning: {tmp_path / 'model' / 'notes.txt'} not copied: it links "
                                       f"to {(tmp_path / 'secret.txt').resolve()}, outside the model folder\n")
    with pytest.raises(CheckpointError, match="notes.txt: it links to .*, outside the model folder; "):
        readable_files(tmp_path / "model", lambda name: name == "notes.txt", "gqa-test", "copied")
