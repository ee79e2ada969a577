"""The training engine: one loop (`train`), the step's forward, the train state (to and from a checkpoint),
optimizer/schedule, checkpoints, runtime."""

from kdkit.engine.loop import EpochShuffle, TrainOptions, TrainResult, train
from kdkit.engine.state import TrainState
from kdkit.engine.step import distill_step

__all__ = ["EpochShuffle", "TrainOptions", "TrainResult", "TrainState", "train", "distill_step"]
