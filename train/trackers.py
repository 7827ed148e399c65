"""Trackers through accelerate (TensorBoard, W&B): checked before any work, fed dotted hyper-parameters."""

from __future__ import annotations

from typing import Any

from gqa_uptrain.dicts import flatten
from gqa_uptrain.errors import ConfigError


def check_trackers(trackers: list[str]) -> None:
    """Fail before any work when a requested tracker's package is missing."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in trackers:
        if not available[name]():
            raise ConfigError(f"log.trackers asks for {name}, which is not installed (pip install {name})")


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted scalar hyper-parameters, as TensorBoard's hparams accept them."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flatten(tree, prefix).items()}
