"""Split into `checkpoint_reader.py` and `checkpoint_writer.py` (issue 23). These names stay importable from here
only for convert/calibration/, which was being changed by another hand when the split was made: delete this file
once its imports name `checkpoint_reader`."""

from gqa_uptrain.convert.checkpoint_reader import SAFETENSORS_INDEX, CheckpointReader, stored_name

__all__ = ["SAFETENSORS_INDEX", "CheckpointReader", "stored_name"]
