"""One model, many skills: one shared adapter trained on a mixture of tasks, against one adapter
per task, with the pairwise transfer matrix (volume 2 §9).

    from splice.multitask import MultitaskConfig, run_multitask
    result = run_multitask(MultitaskConfig.from_yaml("examples/multitask_minilm.yaml"))

CLI: `splice multitask CONFIG.yaml`. Pieces: `mixing_weights` and `MixingSampler` (which task each
batch comes from), `load_tasks` (tagged rows), `train_run` (one run), `transfer_matrix` (Δ_ij).
"""

from splice.multitask.config import MultitaskConfig, TaskSpec
from splice.multitask.data import TaskData, load_tasks
from splice.multitask.harness import MultitaskResult, plan, run_multitask
from splice.multitask.run import RunRecord, train_run
from splice.multitask.sampler import MixingSampler, mixing_weights
from splice.multitask.transfer import transfer_matrix

__all__ = ["MixingSampler", "MultitaskConfig", "MultitaskResult", "RunRecord", "TaskData", "TaskSpec", "load_tasks",
           "mixing_weights", "plan", "run_multitask", "train_run", "transfer_matrix"]
