"""Ways to make G KV heads out of H. The pooling methods are one small module each with a `pool` function (see
base.py); `calibrated` instead fits whole attention layers on calibration text (`convert/calibration/`).

Consecutive heads form a group because query head j attends to KV head j // (query_heads / kv_heads) in every
transformers attention implementation (the calibrated method reorders heads to choose its groups).
"""

from gqa_uptrain.convert.methods import first, mean, random_init
from gqa_uptrain.convert.methods.base import Method, PoolContext, PoolFn

# The one list of methods: --method's choices, the pipeline recipe's `convert.method`, the model card's sentence
# and the arms of scripts/reproduce_gqa.py all come from here.
METHODS: dict[str, Method] = {
    "mean": Method(mean.pool, "each new key/value head is the mean of the heads in its group."),
    "first": Method(first.pool, "each new key/value head is the first head of its group."),
    "random": Method(random_init.pool, "the key/value projections were freshly initialised."),
    "calibrated": Method(None, "heads were grouped, and each group's shared key and value fitted, to reproduce "
                               "the original attention on calibration text (training-free; q/k/v/o projections "
                               "rewritten)."),
}

__all__ = ["METHODS", "Method", "PoolContext", "PoolFn"]
