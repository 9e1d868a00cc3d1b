"""Training adapters: a config, data loading, the two tasks, the loop, and the run report.

    from splice.train import TrainConfig, run
    result = run(TrainConfig())                      # the main job: LoRA on MiniLM, Rotten Tomatoes
    result.metrics["after"]["test"]["accuracy"]
"""

from splice.train.config import TrainConfig
from splice.train.loop import RunResult, TrainingInterrupted, evaluate, evaluate_adapter, resume, run

__all__ = ["RunResult", "TrainConfig", "TrainingInterrupted", "evaluate", "evaluate_adapter", "resume", "run"]
