"""`python -m gqa_uptrain.convert` is `gqa-convert`."""

from gqa_uptrain.convert.cli import main

main()
