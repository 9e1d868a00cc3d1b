"""Learning task after task without forgetting: a harness that trains a sequence of tasks with one
strategy and measures what is remembered (accuracy matrix, BWT, FWT, forgetting, costs).

    from splice.continual import SequenceConfig, run_sequence
    result = run_sequence(SequenceConfig.from_yaml("examples/continual_minilm.yaml"))

CLI: `splice continual SEQUENCE.yaml`. Strategies: `STRATEGIES` (sequential, separate, olora, ...).
"""

from splice.continual.harness import ContinualResult, run_sequence
from splice.continual.metrics import Scores, scores
from splice.continual.sequence import SequenceConfig, TaskSpec
from splice.continual.strategies import STRATEGIES, Strategy, TaskContext

__all__ = ["STRATEGIES", "ContinualResult", "Scores", "SequenceConfig", "Strategy", "TaskContext", "TaskSpec",
           "run_sequence", "scores"]
