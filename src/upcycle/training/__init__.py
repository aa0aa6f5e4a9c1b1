"""The one training loop every method shares, checkpoint/resume, and executors for independent jobs."""

from upcycle.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
