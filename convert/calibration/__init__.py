"""`--method calibrated`: a training-free conversion fitted to what the heads compute on calibration text.

`data.py` reads and tokenises the calibration text, `layers.py` runs one decoder layer at a time from the
checkpoint (read by `source.py` as the causal LM it runs: a wrapper's language model alone, MoE experts stacked by
transformers' own loading rules), `fit.py` holds the closed-form fits (grouping, shared keys under RoPE, shared
values, temperature, o_proj refit), `calibrate.py` runs them layer by layer, `store.py` keeps the finished layers so
that an interrupted run resumes at the next one.
"""
