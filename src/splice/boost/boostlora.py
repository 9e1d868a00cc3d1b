"""BoostLoRA with the trainer: rounds of TinyLoRA, each trained on what the model still gets
wrong, merged exactly and discarded (Anantha, Levato, Price, arXiv 2604.27308; volume-1 §9).

    for k = 0, 1, ...:
        D_k   = the training rows the model gets wrong (`mine="errors"`), with a share
                `mix_correct` of rows it gets right (against drift), or every row (`mine="all"`);
                round 0 takes every row unless `first_round_all=False` (gradient boosting's F_0:
                the mistakes of a model with a fresh classification head are noise, often a
                whole class, and training on them alone teaches the head that class)
        stop  if D_k is empty, the slices are used up, or `rounds` rounds ran
        train a fresh TinyLoRA(r, u) in the next singular slice of W0 on D_k (the trainer: its
                optimizer, schedule, validation and best-state keeping), `steps_per_round` steps
        keep  it (merge into W, discard) if validation improved on the model before the round;
              else undo it and, after `patience` such rounds, stop

Rank grows by r per kept round at no inference cost: the model is the base architecture with
changed weights. The whole change is also saved as a LoRA of rank K r for the original base
(<output_dir>/adapter, PEFT format), with the classification head as the last round left it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import set_seed
from rich.console import Console
from safetensors.torch import load_file

import splice
from splice.assets import DatasetSplits, Row
from splice.boost.rounds import ROUND_ADAPTER, BoostRounds
from splice.core.errors import ConfigError, SpliceError
from splice.core.validation import check_config_fields, config_changes, did_you_mean, show, yaml_number
from splice.io.adapter_files import WEIGHTS_NAME
from splice.io.adapter_states import save_state
from splice.io.files import atomic_directory, write_json, write_weights
from splice.io.output_dirs import check_output_dir
from splice.train import Trainer, tasks
from splice.train.config import TrainConfig, read_yaml_mapping, split_settings
from splice.train.data import load_splits
from splice.train.evaluation import correct_rows, evaluate
from splice.train.results import TrainingInterrupted

Mine = Literal["errors", "all"]
PROGRESS = "progress"  # <output_dir>/progress/: a stopped run's state, for resume
PLACE_KEYS = ("targets", "exclude", "layers", "layers_pattern", "train_also")  # what the config's adapter gives
STOPS = {
    "solved": "no training row left wrong",
    "no_gain": "validation stopped improving",
    "slices": "the singular slices are used up",
    "rounds": "the round limit",
}


@dataclass
class BoostSettings:
    """How BoostLoRA boosts (the `boost:` section of a config file; `boostlora`'s keywords).

    Attributes:
        rounds: the most rounds (K); the merged change has rank up to K r.
        r: width of each round's singular slice (TinyLoRA's r; BoostLoRA uses 1-4).
        u: trainable numbers per module and round (TinyLoRA's u; at most r², the entries of its
            r x r core: more add nothing).
        mine: "errors" (train each round on the rows still wrong) or "all" (every row: rounds
            that rotate without boosting, the ablation).
        mix_correct: the share of a mined round's rows drawn from rows already right, against
            drift (0 for none).
        rotate: a new singular slice each kept round (ROTATE); False reuses the top one, which
            caps the merged change's rank at r (the negative control).
        steps_per_round: optimizer steps of a round (default: the config's budget / rounds).
        patience: rounds without a validation gain (each undone) before stopping.
        first_round_all: round 0 trains on every row (gradient boosting's F_0).
    """

    rounds: int = 8
    r: int = 2
    u: int = 4
    mine: Mine = "errors"
    mix_correct: float = 0.1
    rotate: bool = True
    steps_per_round: int | None = None
    patience: int = 1
    first_round_all: bool = True

    def __post_init__(self) -> None:
        check_config_fields(self, SpliceError)
        problems = [f"{name} must be >= 1, got {value}" for name, value in
                    (("rounds", self.rounds), ("r", self.r), ("u", self.u), ("patience", self.patience),
                     ("steps_per_round", 1 if self.steps_per_round is None else self.steps_per_round))
                    if value < 1]
        if not 0.0 <= self.mix_correct < 1.0:
            problems.append(f"mix_correct must be in [0, 1), got {self.mix_correct}")
        if problems:
            raise SpliceError("boost: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "boost", **overrides: Any) -> BoostSettings:
        """From a YAML mapping; None-valued overrides (flags not given) are ignored; an unknown key
        is refused with the closest known one."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: boost must be a mapping of settings, got {show(data)}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown boost setting {key!r}{did_you_mean(key, known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = {k: yaml_number(v) for k, v in {**data, **given}.items()}
        try:
            return cls(**merged)
        except SpliceError as err:
            raise ConfigError(f"{where}: {err}") from None


def read_boost_config(path: str | Path, *, settings: dict[str, Any] | None = None,
                      **overrides: Any) -> tuple[TrainConfig, BoostSettings]:
    """The training fields (`settings`: `--set KEY=VALUE`) and the `boost:` section (`overrides`:
    flags) of a BoostLoRA YAML. The adapter, if given, says only where (targets, exclude, layers,
    layers_pattern, train_also): a rank or any other adapter key there, in the file or in
    `settings`, is refused, pointing at the boost settings (each round is a TinyLoRA of r, u)."""
    fields = read_yaml_mapping(path, "config file", "config fields")
    section = fields.pop("boost", None)
    boost = BoostSettings.from_dict({} if section is None else section, where=path, **overrides)
    given = [*(fields.get("adapter") or {}), *split_settings(settings or {})[1]]
    other = [key for key in given if key not in (*PLACE_KEYS, "method")]
    if other:
        raise ConfigError(f"{path}: the adapter of a BoostLoRA config says only where ({', '.join(PLACE_KEYS)}); "
                          f"{', '.join(repr(k) for k in other)} cannot be used: each round is a TinyLoRA set by "
                          f"boost: ({', '.join(f.name for f in dataclasses.fields(BoostSettings))}) or the "
                          "flags --r, --u, --rounds, ...")
    try:
        return TrainConfig.from_dict(fields, settings=settings), boost
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclass
class BoostRound:
    """One round: what it trained on, what it changed, whether it was kept."""

    round: int
    offset: int  # first singular index of its slice
    train_error_before: float  # share of training rows wrong before the round
    failing: int  # those rows
    trained_rows: int  # rows trained on (failing + mixed-in right ones, or all)
    steps: int
    validation_before: float | None  # the main metric (accuracy; loss for causal LM)
    validation_after: float | None
    kept: bool
    trainable: int  # parameters the round trained (u per module, and the head's)
    adapter_parameters: int  # of them, the TinyLoRA's: u x modules
    rank: dict[str, float]  # rank of W - W0 over modules after the round: mean, min, max
    seconds: float


@dataclass
class BoostResult:
    """The rounds, why they stopped, and the boosted model's scores."""

    config: dict[str, Any]
    settings: dict[str, Any]
    rounds: list[BoostRound] = field(default_factory=list)
    stop: str = "rounds"
    train_error: float | None = None  # after the last kept round
    test: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    metric: str = "accuracy"
    adapter: str | None = None  # the LoRA file of the whole change
    wall_seconds: float = 0.0
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # boosted: merged weights
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        objects = ("model", "tokenizer")  # not plain data
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in objects}
        return asdict(BoostResult(**plain)) | {"kept": self.kept, "stop_reason": STOPS[self.stop]}


def boostlora(trainer_or_config: Trainer | TrainConfig, rounds: int = 8, r: int = 2, u: int = 4,
              mine: Mine = "errors", mix_correct: float = 0.1, *, rotate: bool = True,
              steps_per_round: int | None = None, patience: int = 1, first_round_all: bool = True,
              console: Console | None = None, overwrite: bool = False, resume: bool = False) -> BoostResult:
    """Boost TinyLoRA rounds on the model and data of `trainer_or_config`; the result (its
    `model` the boosted one: the base architecture with merged weights), with the rounds' runs
    under `<output_dir>/rounds/`, the whole change as a LoRA in `<output_dir>/adapter` and the
    report in `<output_dir>/report/` (boost.json, boost.md, boost.png).

    A config: its model, data and training settings; its adapter gives only the places
    (targets, exclude, layers: LoRA's q,v stays q,v). A trainer: its model (the adapter it
    trains is removed, keeping its places), data and config. Steps per round default to the
    config's whole budget split evenly over `rounds`, so that boosting and one adapter train
    the same number of steps.

    After every round the kept rounds' factors, the heads and the records are written to
    `<output_dir>/progress/` (removed when the run ends); `resume=True` continues a stopped run
    there from a fresh model, under the same config and settings, and ends as the run that never
    stopped (the rounds are replayed with the merge's own arithmetic).
    """
    from splice.boost.report import write_report

    boost = BoostSettings(rounds=rounds, r=r, u=u, mine=mine, mix_correct=mix_correct, rotate=rotate,
                          steps_per_round=steps_per_round, patience=patience, first_round_all=first_round_all)
    console = console or Console()
    started = time.perf_counter()
    config = trainer_or_config.config if isinstance(trainer_or_config, Trainer) else trainer_or_config
    _check_config(config)
    if resume and overwrite:
        raise SpliceError("resume continues a run and overwrite replaces it: pass one of them")
    out = Path(config.output_dir) if resume else check_output_dir(config.output_dir, overwrite)
    saved = read_progress(out, config, boost) if resume else None  # before a trainer's adapter is taken off
    model, tokenizer, config, splits, places = _setup(trainer_or_config)
    if out.exists() and overwrite:  # replaced as a whole: no round or adapter of an earlier run is left
        shutil.rmtree(out)
    if not splits.validation:
        console.print("[yellow]no validation rows: every round is kept; only an empty failing set or the round "
                      "limit stops the boosting[/]")
    steps = steps_per_round or max(1, _total_steps(config, len(splits.train)) // rounds)
    engine = BoostRounds(model, r, u, rotate=rotate, max_rounds=rounds, seed=config.seed, **places)
    settings = asdict(boost) | {"steps_per_round": steps}
    result = BoostResult(config=config.to_dict(), settings=settings, metric=tasks.MAIN_METRIC[config.task][0],
                         model=model, tokenizer=tokenizer)
    higher = tasks.MAIN_METRIC[config.task][1]
    misses = 0
    if saved is not None:
        tensors, progress = saved
        engine.restore(tensors, progress["engine"])
        result.rounds, misses = [BoostRound(**r) for r in progress["rounds"]], progress["misses"]
        console.print(f"resumed {out}: {len(result.rounds)} round(s) done, {engine.kept} kept")
    while True:
        correct = correct_rows(model, tokenizer, splits.train, config)
        round_mine = "all" if first_round_all and engine.kept == 0 else mine  # until a round is kept: F_0
        if mine == "errors" and bool(correct.all()):
            result.stop = "solved"
            break
        if not engine.slices_left():
            result.stop = "rounds" if engine.started >= rounds else "slices"
            break
        record = _round(engine, model, tokenizer, config, splits, correct, round_mine, mix_correct, steps, out,
                        console)
        result.rounds.append(record)
        improved = record.validation_after is None or record.validation_before is None or (
            record.validation_after > record.validation_before if higher
            else record.validation_after < record.validation_before)
        engine.end(keep=improved)
        record.kept = improved
        record.rank = _rank_summary(engine)
        console.print(_round_line(record, result.metric))
        misses = 0 if improved else misses + 1
        write_progress(out, engine, result, misses, boost)
        if misses >= patience:
            result.stop = "no_gain"
            break
    result.train_error = 1.0 - float(correct.float().mean())  # the model is as `correct` saw it (an undone round)
    for name, rows in (("validation", splits.validation), ("test", splits.test)):
        if rows:
            getattr(result, name).update(evaluate(model, tokenizer, rows, config))
    if engine.kept:
        result.adapter = str(save_state(engine.adapter_state(), out / "adapter", overwrite=True))
    result.wall_seconds = time.perf_counter() - started
    write_report(result, out / "report")
    shutil.rmtree(out / PROGRESS, ignore_errors=True)  # the run ended: nothing to resume
    return result


def write_progress(out: Path, engine: BoostRounds, result: BoostResult, misses: int, boost: BoostSettings) -> None:
    """The run after its last round, whole or not at all: what `read_progress` gives back."""
    tensors, meta = engine.state()
    with atomic_directory(out / PROGRESS, overwrite=True) as tmp:
        write_weights(tmp, tensors)
        write_json(tmp / "progress.json", {"config": result.config, "boost": asdict(boost), "engine": meta,
                                           "misses": misses, "rounds": [asdict(r) for r in result.rounds]})


def read_progress(out: Path, config: TrainConfig, boost: BoostSettings) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, Any]]:
    """The saved state of the stopped run in `out`, refused with the reason where there is none,
    it is unreadable, or it ran under another config or other settings (naming what changed)."""
    folder = out / PROGRESS
    if not (folder / "progress.json").is_file():
        raise SpliceError(f"cannot resume {out}: it has no {PROGRESS}/progress.json (no round of a boostlora run "
                          "finished there, or the run ended); start it without --resume")
    try:
        progress = json.loads((folder / "progress.json").read_text())
        tensors = load_file(folder / WEIGHTS_NAME) if (folder / WEIGHTS_NAME).is_file() else {}
    except Exception as err:  # a truncated or foreign file: say which and why
        raise SpliceError(f"cannot resume {out}: {folder} is unreadable ({type(err).__name__}: {err})") from err
    current = {"config": json.loads(json.dumps(config.to_dict(), default=str)), "boost": asdict(boost)}
    for key, value in current.items():
        if progress.get(key) != value:
            raise SpliceError(f"cannot resume {out}: it was started with another {key} "
                              f"({'; '.join(config_changes(progress.get(key) or {}, value))}); a resumed run "
                              "continues the same one")
    return tensors, progress


def _round(engine: BoostRounds, model: torch.nn.Module, tokenizer: Any, config: TrainConfig, splits: DatasetSplits,
           correct: torch.Tensor, mine: Mine, mix_correct: float, steps: int, out: Path,
           console: Console) -> BoostRound:
    """Train round `engine.started` on the mined rows; its record (kept and rank set by the caller)."""
    started = time.perf_counter()
    k = engine.started
    rows = mined_rows(splits.train, correct, mine, mix_correct, seed=config.seed + k)
    offset = engine.offset
    adapters = engine.begin()
    round_config = dataclasses.replace(
        config, max_steps=steps, seed=config.seed + k, output_dir=str(out / "rounds" / f"round-{k}"),
        adapter=engine.template.replace(offset=offset).to_dict() | {"targets": sorted(adapters)}, init_adapter=None)
    shutil.rmtree(round_config.output_dir, ignore_errors=True)  # a stopped run's unfinished round starts again
    set_seed(round_config.seed)
    trainer = Trainer(model, tokenizer, round_config, adapter_name=ROUND_ADAPTER, console=console,
                      splits=DatasetSplits(rows, splits.validation, [], config.task, splits.label_names))
    try:
        run = trainer.fit()
    except TrainingInterrupted as err:
        engine.end(keep=False)
        raise SpliceError(f"BoostLoRA stopped in round {k} (signal {err.signal_number}); the {engine.kept} "
                          f"round(s) kept before it are saved in {out / PROGRESS}: continue with the same command "
                          "and --resume") from None
    metric = tasks.MAIN_METRIC[config.task][0]
    before, after = run.metrics["before"].get("validation"), run.metrics["after"].get("validation")
    return BoostRound(
        round=k, offset=offset, train_error_before=1.0 - float(correct.float().mean()),
        failing=int((~correct).sum()), trained_rows=len(rows), steps=trainer.step_count,
        validation_before=before[metric] if before else None, validation_after=after[metric] if after else None,
        kept=False, trainable=sum(p.numel() for p in trainer.trained.values()),
        adapter_parameters=sum(a.v.numel() for a in adapters.values()), rank={},
        seconds=time.perf_counter() - started)


def mined_rows(rows: list[Row], correct: torch.Tensor, mine: Mine, mix_correct: float, seed: int) -> list[Row]:
    """The rows a round trains on: every row (`all`), or the wrong ones with right ones mixed in
    so that they make up `mix_correct` of the round's rows (as far as there are any), drawn
    with `seed`; in the order of `rows`."""
    if mine == "all":
        return list(rows)
    wrong = (~correct).nonzero().flatten().tolist()
    right = correct.nonzero().flatten()
    extra = min(len(right), math.floor(mix_correct / (1.0 - mix_correct) * len(wrong))) if mix_correct > 0 else 0
    picked = right[torch.randperm(len(right), generator=torch.Generator().manual_seed(seed))[:extra]].tolist()
    return [rows[i] for i in sorted(wrong + picked)]


def _setup(source: Trainer | TrainConfig) -> tuple[torch.nn.Module, Any, TrainConfig, DatasetSplits, dict[str, Any]]:
    """The model (no adapter on it), tokenizer, config, data and the adapter's places."""
    if isinstance(source, Trainer):
        model, config = source.plain_model, source.config
        template = splice.adapters(model)[source.adapter_name]
        splice.detach(model, source.adapter_name)
        splits = DatasetSplits(source.train_rows, source.eval_rows.get("validation", []),
                               source.eval_rows.get("test", []), config.task)
        return model, source.tokenizer, config, splits, _places(template)
    set_seed(source.seed)
    splits = load_splits(source)
    if not splits.train:
        raise SpliceError(f"no training rows in {source.data}")
    model, tokenizer = tasks.load_model(source, splits.label_names)
    return model, tokenizer, source, splits, _places(tasks.adapter_config(source, model))


def _check_config(config: TrainConfig) -> None:
    """Refuse, before any work, what the rounds cannot honour."""
    if config.init_adapter is not None:
        raise SpliceError(f"init_adapter: {config.init_adapter!r}: BoostLoRA boosts the base weights; to boost on "
                          "top of an adapter, merge it into the model first (splice.unload) and pass the model's "
                          "trainer")
    if config.save_format == "peft":
        raise SpliceError("save_format: 'peft': each round's TinyLoRA is saved in splice's format (PEFT has no "
                          "such method); the whole change is written as a PEFT LoRA (<output_dir>/adapter) anyway")
    if config.quantize is not None:
        raise SpliceError(f"quantize: {config.quantize!r}: every kept round is merged into the base weights, which "
                          "a 4-bit weight cannot hold; boost a full-precision model")


def _places(template: Any) -> dict[str, Any]:
    return {"targets": template.targets, "exclude": template.exclude, "layers": template.layers,
            "layers_pattern": template.layers_pattern, "train_also": list(template.train_also)}


def _total_steps(config: TrainConfig, rows: int) -> int:
    """The optimizer steps the config trains one adapter for."""
    batches = math.ceil(rows / config.batch_size)
    return config.max_steps or max(1, math.ceil(config.epochs * batches / config.grad_accum))


def _rank_summary(engine: BoostRounds) -> dict[str, float]:
    ranks = list(engine.ranks().values())
    if not ranks:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": sum(ranks) / len(ranks), "min": float(min(ranks)), "max": float(max(ranks))}


def _round_line(record: BoostRound, metric: str) -> str:
    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    verdict = "kept" if record.kept else "[yellow]undone[/] (no validation gain)"
    return (f"round {record.round}: {record.failing} rows wrong ({record.train_error_before:.1%}), trained on "
            f"{record.trained_rows} for {record.steps} steps; validation {metric} {shown(record.validation_before)} "
            f"-> {shown(record.validation_after)}: {verdict}; rank of W - W0 {record.rank['mean']:.1f}")
