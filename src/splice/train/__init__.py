"""Training adapters: a config, data loading, the two tasks, the trainer, and the run report.

    from splice.train import TrainConfig, Trainer, run
    result = run(TrainConfig())                      # the main job: LoRA on MiniLM, Rotten Tomatoes
    result.metrics["after"]["test"]["accuracy"]

    trainer = Trainer.from_config(TrainConfig(...))  # or Trainer(model, tokenizer, config, adapter_name=...)
    while not trainer.done:
        trainer.step()
    result = trainer.finish()
"""

from splice.train.callbacks import Callback
from splice.train.config import TrainConfig, describe_data
from splice.train.ending import Tenancy
from splice.train.evaluation import evaluate, evaluate_adapter
from splice.train.loop import resume, run
from splice.train.results import RunResult, TrainingInterrupted
from splice.train.trainer import Trainer

__all__ = ["Callback", "RunResult", "Tenancy", "TrainConfig", "Trainer", "TrainingInterrupted", "describe_data",
           "evaluate", "evaluate_adapter", "resume", "run"]
