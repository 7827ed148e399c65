"""gqa-uptrain: turn multi-head-attention checkpoints into grouped-query attention and uptrain them.

This package's own modules (the folder base/) are what the tools share; they import no tool and no app:
- `errors`: one class per kind of user mistake, `one_line` for another library's exception in a message, and
  `is_full_disk` for a write refused for want of space;
- `cli`: a command's user mistakes end in one line on stderr; `options`: a command's options as one pydantic model,
  its argparse flags made from it;
- `source`: a local folder or a Hub id, resolved to a local folder;
- `kv_heads`: KV heads of a config, a config with another count, the model built on the meta device, KV-cache bytes;
- `provenance`: the `gqa_provenance.json` record (its schema; building, reading and writing it);
- `tokenizer_identity`: when two tokenizers are the same one;
- `paths`: `~` expanded, and output folders that cannot be one refused; `dicts`: flattening nested dicts to dotted
  keys;
- `atomic_write`: files written so that no reader sees half of one, and fsynced before they are published;
- `hashing`: SHA-256 of files, in child processes while this one goes on;
- `renames`: renames that never replace by accident, an atomic swap, and `move_into_place`, the one way a finished
  folder is put in place;
- `locks`: an exclusive lock on an output, an flock on a file that names its holder (`output_lock`, every tool's);
- `model_folder`: which files of a model folder may be read (links are followed only while they stay inside it);
- `documents`: text, JSON lines, parquet files or a Hub dataset, read through `datasets`.
- `plotting`: matplotlib's pyplot on the file-only Agg backend, for every PNG the tools draw.
- `sizes`: byte counts as people read them (`human_size`), in every message and table.
The tools are the subpackages `convert` (gqa-convert), `train` (gqa-uptrain) and `eval` (gqa-eval); each imports
only this layer. `apps` (demo, pipeline, publish, scratch) is built on the tools. tests/test_layout.py holds to it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gqa-uptrain")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
