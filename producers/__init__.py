"""Producers: hooks that run inside training jobs and publish per-step tensor statistics.

`Hook` is framework-neutral; the PyTorch integration is `tensorpulse.producers.torch.TorchHook`
(imported from there, so that importing this package never imports torch).
"""

from __future__ import annotations

from .hook import Hook
from .schedule import SaveConfig, SaveConfigMode

__all__ = ["Hook", "SaveConfig", "SaveConfigMode"]
