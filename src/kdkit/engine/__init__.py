"""The training engine: one loop (`train`), the step's forward, optimizer/schedule, checkpoints, runtime."""

from kdkit.engine.loop import EpochShuffle, TrainOptions, TrainResult, train
from kdkit.engine.step import distill_step

__all__ = ["EpochShuffle", "TrainOptions", "TrainResult", "train", "distill_step"]
