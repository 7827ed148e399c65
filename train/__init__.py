"""gqa-uptrain: the uptraining loop (recipe -> budget -> data -> loop -> checkpoints -> export).

Where things happen: `recipe.py` validates the YAML, `budget.py` turns the paper's budget into steps and
FLOPs, `data.py` tokenises and packs, `loop.py` takes the optimizer steps (`cadence.py` says when to log,
evaluate and save), `distill.py` holds the distillation loss, `checkpoint.py` saves and resumes, `metrics.py`
logs, `export.py` writes the final folder.
"""
