"""Med-DualLoRA (Perramon-Llussà et al., MICCAI 2026, arXiv 2603.10967): a global LoRA that the
server averages and a local LoRA per client that never leaves it,

    y = W0 x + s_g B_g A_g x + s_l B_l^(c) A_l^(c) x        at client c,

trained jointly on the client's data each round; only (A_g, B_g) (and the trained head) are
uploaded and FedAvg'ed; a client predicts with both. The local adapter personalises a client
whose labels are shifted from the others' without pulling the shared one toward them.

Options: `local_adapter`, the local adapter's mapping (default: the global adapter's).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

import splice
from splice.core.errors import ConfigError
from splice.core.progress import use as progress_to
from splice.federated.methods.base import FederatedMethod
from splice.train import tasks as train_tasks
from splice.train.adapters import adapter_parameters
from splice.train.evaluation import evaluate

if TYPE_CHECKING:
    from splice.federated.client import LocalRun
    from splice.federated.config import FederatedConfig

LOCAL = "local"


class DualLoRA(FederatedMethod):
    """Med-DualLoRA: a never-uploaded local adapter beside the global one at every client."""

    name: ClassVar[str] = "dual"
    OPTIONS: ClassVar[dict[str, Any]] = {"local_adapter": None}
    sequences: ClassVar[bool] = False

    def check(self, config: FederatedConfig) -> None:
        local = self.options["local_adapter"]
        if local is not None and not isinstance(local, dict):
            raise ConfigError(f"options.local_adapter must be an adapter mapping ({{method: lora, r: 4, ...}}), "
                              f"got {local!r}")
        try:  # a bad local adapter fails now, not in a client
            config.train_config(local_mapping(local or config.adapter))
        except ConfigError as err:
            where = "options.local_adapter" if local is not None else "adapter (the local adapter's too)"
            raise ConfigError(f"{where}: {err}") from None

    def prepare(self, run: LocalRun) -> None:
        mapping = local_mapping(self.options["local_adapter"] or run.config.adapter)
        local = train_tasks.adapter_config(run.config.train_config(mapping), run.model)
        splice.attach(run.model, local.replace(train_also=[]), LOCAL)
        splice.activate(run.model, [run.GLOBAL, LOCAL])  # both train, and both answer at this client
        self.initial = self.private_state(run)  # every client's first local adapter: the same seeded init

    def companions(self) -> list[str]:
        return [LOCAL]

    def private_state(self, run: LocalRun) -> dict[str, torch.Tensor]:
        """The local adapter's own tensors (the heads it shares with the global one are global)."""
        shared = adapter_parameters(run.model, run.GLOBAL)
        return {n: p.detach().to("cpu", copy=True) for n, p in adapter_parameters(run.model, LOCAL).items()
                if n not in shared}

    def restore_private(self, run: LocalRun, state: Mapping[str, torch.Tensor] | None) -> None:
        run.copy_in(state if state is not None else self.initial)

    def evaluate_metrics(self, run: LocalRun, client: int) -> dict[str, float]:
        """The global adapter alone on the client's rows (`global_<metric>`): what the local one adds."""
        rows = run.shards.test[client]
        splice.activate(run.model, run.GLOBAL)
        try:
            with progress_to(quiet=True):
                alone = evaluate(run.model, run.tokenizer, rows, run.train_config)
        finally:
            splice.activate(run.model, [run.GLOBAL, LOCAL])
        return {f"global_{key}": float(value) for key, value in alone.items()}

    def last_round(self, run: LocalRun, client: int) -> None:
        path = Path(run.config.output_dir) / "clients" / f"client-{client}" / "local-adapter"
        splice.save(run.model, path, LOCAL, overwrite=True)


def local_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """The local adapter's config: SFed-LoRA's sqrt(N) makes up for averaging N clients' updates,
    and the local adapter is never averaged, so its N is 1 (rsLoRA's alpha / sqrt(r)) unless given."""
    if mapping.get("scaling") == "sfed" and mapping.get("num_clients") is None:
        return {**mapping, "num_clients": 1}
    return mapping
