"""PARA's budget sweep measured on data (`splice compress --sweep`): the base model is loaded
once, the uncompressed adapter and each budget's compression are attached to it in turn and
evaluated on the same rows, and the report (sweep.json, sweep.png and one adapter folder per
budget) is written whole or not at all."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.compression.para import Allocation, Normalize, sweep
from splice.compression.para_report import SweepPoint, plot_sweep
from splice.core import progress
from splice.core.adapter_state import AdapterState
from splice.core.errors import SpliceError
from splice.io.adapter_states import AdapterSource, adapter_state

if TYPE_CHECKING:
    from splice.train import TrainConfig


@dataclass
class DataSweep:
    """A sweep scored on a data set.

    Attributes:
        points: budget -> SweepPoint, whose `metric` is the value of `metric`.
        metric: the metric the points carry and the plot shows.
        metrics: every metric of the uncompressed adapter, then of each budget in order.
        config: the model, task, data and evaluation settings it was measured with.
        split, rows: the split of the data set and how many of its rows were evaluated.
        allocation, normalize: as passed to PARA.
        parameters: the uncompressed adapter's parameters.
    """

    points: dict[float, SweepPoint]
    metric: str
    metrics: list[dict[str, float]]
    config: TrainConfig
    split: str
    rows: int
    allocation: str
    normalize: str
    parameters: int

    @property
    def reference(self) -> float:
        """The uncompressed adapter's value of `metric`."""
        return self.metrics[0][self.metric]

    def to_dict(self) -> dict[str, Any]:
        """sweep.json: the setting, the reference and, per budget, its point, metrics and folder."""
        return {
            "adapter_parameters": self.parameters, "metric": self.metric, "reference": self.reference,
            "reference_metrics": self.metrics[0], "model": self.config.model, "task": self.config.task,
            "data": self.config.data, "split": self.split, "rows": self.rows, "allocation": self.allocation,
            "normalize": self.normalize,
            "points": [p.to_dict() | {"metrics": m, "folder": f"budget-{b:g}"}
                       for (b, p), m in zip(self.points.items(), self.metrics[1:], strict=True)],
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write each budget's adapter (budget-B/, HF PEFT format), sweep.json and sweep.png into
        `path`, all or none; a non-empty folder is refused unless `overwrite`."""
        from splice.io.adapter_states import save_state
        from splice.io.files import atomic_directory, write_json

        with atomic_directory(path, overwrite=overwrite) as folder:
            for budget, point in self.points.items():
                save_state(point.result.state, folder / f"budget-{budget:g}")
            write_json(folder / "sweep.json", self.to_dict())
            plot_sweep(self.points, folder / "sweep.png", metric=self.metric, reference=self.reference,
                       title=f"PARA sweep: {self.metric} on {self.config.data} ({self.split})")
        return Path(path)


def sweep_on_data(source: AdapterSource | AdapterState, budgets: Iterable[float], *, data: str,
                  model: str | None = None, task: str | None = None, split: str = "test", metric: str | None = None,
                  allocation: Allocation = "global", normalize: Normalize = "none", batch_size: int = 32,
                  max_length: int = 64, max_eval_examples: int | None = None) -> DataSweep:
    """Compress `source` to each budget and evaluate the uncompressed adapter and every result on
    `data` (a bundled data set's `split`, or a whole .jsonl/.csv file) with `model` as the base.

    `model` defaults to the adapter's recorded base model, `task` to its PEFT task_type (else
    the model's usual task), `metric` to the task's main one (accuracy, or loss for causal_lm);
    `max_eval_examples` keeps the first N rows.
    """
    from splice.core.api import detach
    from splice.io.peft_format import attach_state
    from splice.train import TrainConfig
    from splice.train.adapter_base import PEFT_TASKS
    from splice.train.data import load_eval_rows
    from splice.train.loop import evaluate
    from splice.train.tasks import MAIN_METRIC, default_task, load_model

    state = source if isinstance(source, AdapterState) else adapter_state(source)
    model = model or state.base_model
    if not model:
        raise SpliceError("the adapter names no base model; pass model= (CLI: --model)")
    task = task or PEFT_TASKS.get(state.task_type or "")
    config = TrainConfig.from_dict(model=model, task=task or default_task(model), data=data, batch_size=batch_size,
                                   max_length=max_length, max_eval_examples=max_eval_examples)
    metric = metric or MAIN_METRIC[config.task][0]
    rows = load_eval_rows(config, split)
    if not rows.test:
        raise SpliceError(f"no rows to evaluate in {data!r} ({split})")
    net, tokenizer = load_model(config, rows.label_names)
    metrics: list[dict[str, float]] = []

    def score(candidate: AdapterState) -> float:
        attach_state(net, candidate, "para")
        try:
            measured = evaluate(net, tokenizer, rows.test, config)
        finally:
            detach(net, "para")
        if metric not in measured:
            raise SpliceError(f"no metric {metric!r}; the evaluation gives {', '.join(measured)}")
        metrics.append(measured)
        return measured[metric]

    score(state)
    points = sweep(state, progress.track(list(budgets), "PARA sweep"), evaluate=score, allocation=allocation,
                   normalize=normalize)
    return DataSweep(points, metric, metrics, config, split, len(rows.test), allocation, normalize, state.parameters)
