"""Measure what a conversion cost and what it bought (`gqa-eval`): quality, perplexity, KV cache, decode speed.

Where things happen: `cli.py` turns the flags into `options.py`'s `EvalOptions`, which checks every value for every
caller; `runner.py` runs the evaluation (all input checked first, then one model at a time, the report rewritten
after each); `loading.py` opens the models and compares their tokenizers; `harness.py` runs lm-eval on the tasks
`local_tasks.py` resolves (the shipped offline tasks are in `tasks/`); `perplexity.py` scores held-out text;
`cache.py` fingerprints models and keeps results; `kv_cache.py` measures the KV cache a real generate() leaves
(the config's figure is computed in `gqa_uptrain.kv_heads`); `decode_engine.py` decodes as a serving engine does,
with the split-KV Triton kernel of `decode_kernels.py`, and `speed.py` times it against stock generate() and the
memory-bound floor; `report.py` computes deltas, standard errors and tables and writes the report files;
`plots.py` draws the report's PNGs.

Importing this package imports nothing else: `gqa-eval --help` stays fast.
"""
