"""Ways to make G KV heads out of H: each method is one small module with a `pool` function (see base.py).

Consecutive heads form a group because query head j attends to KV head j // (query_heads / kv_heads) in every
transformers attention implementation. A calibration-aware method only needs another module like these.
"""

from gqa_uptrain.convert.methods import first, mean, random_init
from gqa_uptrain.convert.methods.base import PoolContext, PoolFn

METHODS: dict[str, PoolFn] = {"mean": mean.pool, "first": first.pool, "random": random_init.pool}

__all__ = ["METHODS", "PoolContext", "PoolFn"]
