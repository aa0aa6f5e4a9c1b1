"""The one training loop every method shares, checkpoint/resume, and executors for independent jobs."""

from upcycle.training.config import TrainConfig
from upcycle.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
