"""`python -m gqa_uptrain.train RECIPE [key=value ...]`: the form `accelerate launch -m` needs."""

from .cli import main

raise SystemExit(main())
