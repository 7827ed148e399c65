"""Ways to make G KV heads out of H. The pooling methods are one small module each with a `pool` function (see
base.py); `calibrated` instead fits whole attention layers on calibration text (`convert/calibration/`).

Consecutive heads form a group because query head j attends to KV head j // (query_heads / kv_heads) in every
transformers attention implementation (the calibrated method reorders heads to choose its groups).
"""

from importlib import import_module

from gqa_uptrain.convert.methods.base import Method, PoolContext, PoolFn


def _pool_of(module: str) -> PoolFn:
    """The `pool` of methods/<module>.py, imported at its first call: the methods import torch, and what only needs
    the names (--method's choices, `gqa-convert --help`, the pipeline recipe) need not wait for it."""
    def pool(heads, groups, context):
        return import_module(f"{__name__}.{module}").pool(heads, groups, context)
    return pool


def _pooling_loss(name: str) -> str:
    return (f"expect a large loss before uptraining: {name} pooling can lose much (a real model's perplexity rose "
            "from 24 to 30,853 at one KV head); --method calibrated keeps more")


def _registry(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


# The one list of methods: --method's choices, the pipeline recipe's `convert.method`, the model card's sentence
# and the arms of scripts/reproduce_gqa.py all come from here.
METHODS: dict[str, Method] = _registry(
    Method("mean", _pool_of("mean"), "each new key/value head is the mean of the heads in its group.",
           "mean-pooled", _pooling_loss("mean"), "average them, the GQA paper's choice"),
    Method("first", _pool_of("first"), "each new key/value head is the first head of its group.",
           "cut to each group's first head", _pooling_loss("first"), "keep the group's first head"),
    Method("random", _pool_of("random_init"), "the key/value projections were freshly initialised.",
           "drawn afresh", _pooling_loss("random"), "fresh projections drawn from the config's initializer_range",
           seeded=True, redraws=True),
    Method("calibrated", None, "heads were grouped, and each group's shared key and value fitted, to reproduce the "
                               "original attention on calibration text (training-free; q/k/v/o projections rewritten).",
           "rewritten", "expect some loss before uptraining, most at few KV heads (a real 135M model at one KV head: "
           "WikiText-2 loss 3.05 -> 4.31, calibrated on books), and less the more the calibration text is like the "
           "model's pretraining data (pass it with --calibration)",
           "training-free: group the heads and fit each group's shared key and value to reproduce the original "
           "attention on calibration text; rewrites q/k/v/o_proj; runs on the GPU when there is one", seeded=True),
)

__all__ = ["METHODS", "Method", "PoolContext", "PoolFn"]
