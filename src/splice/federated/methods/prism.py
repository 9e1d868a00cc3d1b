"""PRISM (Wu, Ding, Huang; arXiv 2605.01061; volume-1 §6): federated continual learning with a
mixture of LoRA experts whose old tasks stay protected after FedAvg.

Routing alone does not keep tasks apart (gradients of a new task still land in the experts old
tasks use), and a client-side orthogonality constraint does not survive averaging when every
client protects its own subspace. PRISM keeps, per expert e of every adapted layer, one basis
M_e [d, k_e] of the inputs earlier tasks routed to e, shared by all clients; every client
projects its update against the same M_e, and since the projection is linear the FedAvg mean
is projected too.

The mechanism, as implemented here (the paper's abstract gives the idea; the details follow the
spec's GPM/InfLoRA reading):

- Each task trains a fresh MoELoRA block (the `global` adapter: A_e, B_e per expert and a
  router); when a task ends its block is frozen as `prism-<t>` and stays active, and the next
  block starts with B = 0, A drawn afresh and projected (A_e M_e = 0), and the router it ends
  with (routing continues; `routing as a capacity allocator`).
- Local training projects the gradient of every A_e off span(M_e) and the router's off the
  union of the experts' bases, and re-projects the parameters after each optimizer step: with
  AdamW the per-coordinate step of a projected gradient leaves the subspace (measured in the
  tests), so the gradient projection alone does not keep A_e M_e = 0. An old input x in
  span(M_e) of the experts its task routed it to then gets the same routing and a zero
  contribution from the new block: its output does not change.
- After a task, a query round: each client sketches, per layer and expert, the residual (off
  M_e) of its gate-weighted inputs (the top eigenpairs of Σ g_e(x) x xᵀ over its rows of the
  finished task, holding `threshold` of the residual's energy: more than the server's criterion
  can ask of it) and reports their energies; the server stacks the sketches and extends M_e by
  GPM's energy threshold, and broadcasts the bases with every later message.

Options: `threshold` (GPM's ε, share of the input energy the basis must hold; 0.97),
`sketch_rank` (most directions a client sends per expert; 32), `basis_rows` (a client's rows
in the sketch; 256), `bases` ("shared": the server's bases; "client": each client's own bases
from its own rows, the negative control whose orthogonality FedAvg breaks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

import splice
from splice.continual.projection import NOISE, extend_basis, orthonormal, project_out, sketch
from splice.core.api import model_state
from splice.core.errors import ConfigError, SpliceError
from splice.core.host import hosts
from splice.federated import payload
from splice.federated.methods.base import FederatedMethod
from splice.io.files import write_tensors
from splice.methods.moelora import MoELoRAAdapter
from splice.train.callbacks import Callback
from splice.train.data import collator, probe_loader

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from splice.federated.client import LocalRun
    from splice.federated.config import FederatedConfig
    from splice.federated.server import ServerRun

GLOBAL = "global"
BASES = "prism.bases"  # a client's own bases in its node state (bases: client)


def block_name(task: int) -> str:
    """The frozen block task `task` left."""
    return f"prism-{task}"


class PRISM(FederatedMethod):
    """PRISM: a MoELoRA block per task, updates projected off shared per-expert input bases."""

    name: ClassVar[str] = "prism"
    OPTIONS: ClassVar[dict[str, Any]] = {"threshold": 0.97, "sketch_rank": 32, "basis_rows": 256, "bases": "shared"}

    def __init__(self, config: FederatedConfig) -> None:
        super().__init__(config)
        self.bases: dict[str, list[torch.Tensor]] = {}  # layer -> per expert [d, k_e]
        self.unions: dict[str, torch.Tensor] = {}  # layer -> [d, m], the router's protected span

    def check(self, config: FederatedConfig) -> None:
        options = self.options
        if config.tasks is None:
            raise ConfigError("method prism learns a task sequence: give tasks (at least two)")
        if config.adapter.get("method") != "moelora":
            raise ConfigError(f"method prism protects the experts of a MoELoRA adapter; the adapter is "
                              f"{config.adapter.get('method')!r} (use adapter: {{method: moelora, ...}})")
        if config.adapter.get("init", "default") != "default":
            raise ConfigError("method prism starts every task's block at B = 0: it needs the MoELoRA init "
                              f"'default', got {config.adapter.get('init')!r}")
        if not (isinstance(options["threshold"], (int, float)) and 0 < options["threshold"] <= 1):
            raise ConfigError(f"options.threshold must be in (0, 1], got {options['threshold']!r}")
        for key in ("sketch_rank", "basis_rows"):
            if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 1:
                raise ConfigError(f"options.{key} must be a positive integer, got {options[key]!r}")
        shared = [spec.name for spec in config.tasks if spec.head is not None]
        if shared:
            raise ConfigError(f"method prism gives every task its own head; {shared} share an earlier task's head, "
                              "which training them would change (the earlier task's outputs with it)")
        if options["bases"] not in ("shared", "client"):
            raise ConfigError(f"options.bases must be 'shared' or 'client', got {options['bases']!r}")

    # -- both sides ------------------------------------------------------------------------------

    def attach_held(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """A frozen block per task but the last (each zero until its task ends; active from then on)."""
        config = model_state(model).adapters[GLOBAL].config
        frozen = dataclasses.replace(config, aux_loss=0.0)  # a frozen router's balance is nothing to learn
        blocks = [block_name(t) for t in range(len(self.config.tasks or []) - 1)]
        for name in blocks:
            splice.attach(model, frozen, name, trainable=False)
            with torch.no_grad():
                for adapter in adapters_of(model, name).values():
                    adapter.lora_B.zero_()
        self.task_selected(model, 0)
        owned = {id(p) for name in blocks for adapter in adapters_of(model, name).values()
                 for p in adapter.parameters()}
        return {n: p for n, p in model.named_parameters() if id(p) in owned}

    def task_selected(self, model: nn.Module, index: int) -> None:
        """The global block and the blocks of the tasks before `index` active (later ones are zero)."""
        splice.activate(model, [GLOBAL, *(block_name(t) for t in range(index))])

    # -- at a client -----------------------------------------------------------------------------

    def prepare(self, run: LocalRun) -> None:
        """Project every gradient of the global block's A rows and router as it is computed."""
        for layer, adapter in adapters_of(run.model, GLOBAL).items():
            adapter.lora_A.register_hook(lambda grad, layer=layer, adapter=adapter:
                                         self.project_A(layer, adapter, grad))
            adapter.router.register_hook(lambda grad, layer=layer: project_out(grad, self.unions.get(layer)))

    def project_A(self, layer: str, adapter: MoELoRAAdapter, A: torch.Tensor) -> torch.Tensor:
        """A [r, d] (or its gradient) with each expert's rows projected off that expert's basis."""
        bases = self.bases.get(layer)
        if not bases:
            return A
        rows = A.unflatten(0, (-1, adapter.rank))
        return torch.stack([project_out(rows[e], bases[e]) for e in range(rows.shape[0])]).flatten(0, 1)

    def receive(self, run: LocalRun, extras: Mapping[str, torch.Tensor]) -> None:
        if self.options["bases"] == "shared":
            self.set_bases(decode_bases(extras, adapters_of(run.model, GLOBAL)))

    def restore_private(self, run: LocalRun, state: Mapping[str, torch.Tensor] | None) -> None:
        if self.options["bases"] == "client":
            self.set_bases(decode_bases(state or {}, adapters_of(run.model, GLOBAL)))

    def private_state(self, run: LocalRun) -> dict[str, torch.Tensor]:
        return encode_bases(self.bases) if self.options["bases"] == "client" else {}

    def set_bases(self, bases: dict[str, list[torch.Tensor]]) -> None:
        self.bases = bases
        self.unions = {layer: orthonormal(torch.cat(each, 1)) for layer, each in bases.items()}

    def callbacks(self, run: LocalRun) -> list[Callback]:
        return [Reprojection(self, run.model)] if self.bases else []

    def answer_query(self, run: LocalRun, client: int) -> ArrayRecord:
        """Per layer and expert: the sketch of this client's gate-weighted inputs off M_e, and
        [total, residual] energies (`bases: client`: its own bases extended at once, kept)."""
        rows = run.shards.train[client][: self.options["basis_rows"]]
        covariances = routed_covariances(run.model, run.tokenizer, rows, run.train_config)
        answer: dict[str, torch.Tensor] = {}
        for layer, per_expert in covariances.items():
            for e, covariance in enumerate(per_expert):
                basis = (self.bases.get(layer) or [None] * len(per_expert))[e]
                residual = residual_covariance(covariance, basis)
                answer[f"sketch/{layer}/{e}"] = sketch(residual, energy=self.options["threshold"],
                                                      max_rank=self.options["sketch_rank"],
                                                      floor=NOISE * float(covariance.trace()))
                answer[f"energy/{layer}/{e}"] = torch.tensor([float(covariance.trace()), float(residual.trace())])
        if self.options["bases"] == "client":
            self.set_bases(merge_sketches(self.bases, [answer], self.options["threshold"]))
        return payload.to_record(answer)

    # -- at the server ---------------------------------------------------------------------------

    def begin_task(self, server: ServerRun, index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task `index` > 0: the global block frozen as the previous task's, and a fresh one with
        A drawn (seeded by the run and the task) off the bases, B = 0, the router kept."""
        if index == 0:
            return state
        state = dict(state)
        generator = torch.Generator().manual_seed(server.config.seed * 1009 + index)
        for layer, adapter in adapters_of(server.model, GLOBAL).items():
            prefix, frozen = f"{layer}.splice.{GLOBAL}.", f"{layer}.splice.{block_name(index - 1)}."
            for key in ("lora_A", "lora_B", "router"):
                state[frozen + key] = state[prefix + key].clone()
            A = fresh_A(adapter, generator)
            state[prefix + "lora_A"] = self.project_A(layer, adapter, A).to(state[prefix + "lora_A"].dtype)
            state[prefix + "lora_B"] = torch.zeros_like(state[prefix + "lora_B"])
        return state

    def extras(self) -> dict[str, torch.Tensor]:
        return encode_bases(self.bases) if self.options["bases"] == "shared" else {}

    def end_task(self, server: ServerRun, grid: Grid, index: int, state: dict[str, torch.Tensor]) -> None:
        """Every client sketches its rows of the finished task; the bases grow by the threshold."""
        if index == len(server.sequence or []) - 1:
            return  # no task after the last: nothing to protect it from
        content = payload.to_record(payload.with_extras(state, self.extras()))
        settings = ConfigRecord({"task": index, "round-offset": index * server.config.rounds})
        nodes = sorted(grid.get_node_ids())
        messages = [Message(RecordDict({payload.ARRAYS: content, payload.CONFIG: settings}), dst_node_id=node,
                            message_type="query") for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=3600))
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) != len(nodes):
            raise SpliceError(f"PRISM's query after task {index}: {len(nodes) - len(replies) + len(failed)} of "
                              f"{len(nodes)} clients gave no sketch ({'; '.join(failed[:2])})")
        if self.options["bases"] == "client":
            return  # every client extended its own bases
        replies.sort(key=lambda m: int(m.content[payload.METRICS]["client"]))
        answers = [m.content[payload.ARRAYS].to_torch_state_dict() for m in replies]
        self.set_bases(merge_sketches(self.bases, answers, self.options["threshold"]))

    def aggregated(self, server: ServerRun, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """The largest ‖A_e M_e‖_F over layers and experts of the aggregated global block (0 with
        shared bases, up to round-off; what FedAvg leaves with client bases is not measured here:
        the server does not know them), the bases' mean size, and the experts whose basis fills
        their whole input space (no room left for new tasks)."""
        if not self.bases:
            return {}
        worst, full = 0.0, 0
        for layer, adapter in adapters_of(server.model, GLOBAL).items():
            rows = state[f"{layer}.splice.{GLOBAL}.lora_A"].double().unflatten(0, (-1, adapter.rank))
            for e, basis in enumerate(self.bases.get(layer, [])):
                worst = max(worst, float((rows[e] @ basis.double()).norm()))
                full += int(basis.shape[1] == basis.shape[0])
        sizes = [b.shape[1] for each in self.bases.values() for b in each]
        return {"prism_orthogonality_error": worst, "prism_basis_mean_dim": sum(sizes) / max(len(sizes), 1),
                "prism_full_experts": float(full)}

    def save_held(self, model: nn.Module, folder: Path) -> None:
        """Every task's frozen block (`blocks/prism-<t>`) and the shared bases (`prism-bases.safetensors`,
        `basis/<layer>/<expert>`: what a later task would have to stay off)."""
        for t in range(len(self.config.tasks or []) - 1):
            splice.save(model, folder / "blocks" / block_name(t), block_name(t), overwrite=True)
        if self.bases:
            write_tensors(folder / "prism-bases.safetensors", encode_bases(self.bases),
                          {"threshold": str(self.options["threshold"])})


class Reprojection(Callback):
    """After each optimizer step: A_e back off span(M_e), the router's change since the round
    began back off the union of the bases (AdamW's step leaves the subspaces)."""

    def __init__(self, method: PRISM, model: nn.Module) -> None:
        self.method = method
        self.adapters = adapters_of(model, GLOBAL)
        self.routers = {layer: a.router.detach().clone() for layer, a in self.adapters.items()}

    def on_step_end(self, trainer: Any, entry: dict[str, Any]) -> None:
        with torch.no_grad():
            for layer, adapter in self.adapters.items():
                adapter.lora_A.copy_(self.method.project_A(layer, adapter, adapter.lora_A))
                start = self.routers[layer]
                adapter.router.copy_(start + project_out(adapter.router - start, self.method.unions.get(layer)))


def adapters_of(model: nn.Module, name: str) -> dict[str, MoELoRAAdapter]:
    """Adapter `name`'s MoELoRA modules by layer name."""
    found = {layer: host[name] for layer, _, host in hosts(model) if name in host}
    wrong = [layer for layer, adapter in found.items() if not isinstance(adapter, MoELoRAAdapter)]
    if wrong:
        raise SpliceError(f"PRISM needs MoELoRA adapters; {wrong[0]!r} has a {type(found[wrong[0]]).__name__}")
    return found


def fresh_A(adapter: MoELoRAAdapter, generator: torch.Generator) -> torch.Tensor:
    """A new [r, d] A drawn as `MoELoRAAdapter.reset` draws it (Kaiming-uniform, a=√5: every
    expert's rows have fan-in d), from `generator`."""
    return nn.init.kaiming_uniform_(torch.empty(adapter.lora_A.shape, dtype=torch.float64), a=math.sqrt(5),
                                    generator=generator)


def residual_covariance(covariance: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """(I - M Mᵀ) C (I - M Mᵀ): the covariance of the inputs' components off span(M)."""
    if basis is None or basis.shape[1] == 0:
        return covariance
    projected = project_out(covariance, basis)
    return project_out(projected.T, basis)


@torch.no_grad()
def routed_covariances(model: nn.Module, tokenizer: Any, rows: list, config: Any) -> dict[str, torch.Tensor]:
    """Per layer of the global block, [E, d, d]: for each expert e, Σ g_e(x) x xᵀ over the attended
    tokens of `rows` (g_e: the router's renormalised top-k weight of e, 0 where e is not picked;
    1 for shared experts)."""
    adapters = adapters_of(model, GLOBAL)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(layer: str):
        adapter = adapters[layer]

        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].double()
            top_w, top_i = adapter.route_tokens(args[0])
            attention = mask["attention"]  # [rows, seq]; a layer whose input is not per token counts every row
            attended = (attention.to(x.device, torch.float64)[..., None] if x.shape[:-1] == attention.shape
                        else torch.ones(*x.shape[:-1], 1, dtype=torch.float64, device=x.device))
            gates = torch.zeros(*top_w.shape[:-1], adapter.routed, dtype=torch.float64, device=x.device)
            gates = gates.scatter(-1, top_i, top_w.double())
            weights = torch.cat([torch.ones_like(gates[..., :1]).expand(*gates.shape[:-1], adapter.shared), gates], -1)
            weights = (weights * attended).reshape(-1, weights.shape[-1])  # [n, E]
            flat = x.reshape(-1, x.shape[-1])  # [n, d]
            weighted = weights.T[:, :, None] * flat[None]  # [E, n, d]
            sums[layer] = sums.get(layer, 0) + weighted.transpose(1, 2) @ flat
        return record

    handles = [modules[layer].register_forward_pre_hook(hook(layer)) for layer in adapters]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        loader = probe_loader(rows, dataclasses.replace(config, batch_size=min(config.batch_size, 32)),
                              collator(config.task, tokenizer, config.max_length))
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            mask["attention"] = batch["attention_mask"]
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {layer: total.cpu() for layer, total in sums.items()}


def merge_sketches(bases: dict[str, list[torch.Tensor]], answers: list[Mapping[str, torch.Tensor]],
                   threshold: float) -> dict[str, list[torch.Tensor]]:
    """The bases extended by the clients' sketches and energies (GPM's threshold on their sum)."""
    layers: dict[str, int] = {}
    for key in answers[0]:
        if key.startswith("sketch/"):
            layer, e = key.removeprefix("sketch/").rsplit("/", 1)
            layers[layer] = max(layers.get(layer, 0), int(e) + 1)
    merged = {}
    for layer, experts in layers.items():
        merged[layer] = []
        for e in range(experts):
            sketches = torch.cat([a[f"sketch/{layer}/{e}"].double() for a in answers], 1)
            energies = torch.stack([a[f"energy/{layer}/{e}"].double() for a in answers]).sum(0)
            old = bases.get(layer, [None] * experts)[e]
            merged[layer].append(extend_basis(old, sketches, threshold, total_energy=float(energies[0]),
                                              residual_energy=float(energies[1])).float())
    return merged


def encode_bases(bases: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"basis/{layer}/{e}": basis.contiguous() for layer, each in bases.items() for e, basis in enumerate(each)}


def decode_bases(state: Mapping[str, torch.Tensor],
                 adapters: dict[str, MoELoRAAdapter]) -> dict[str, list[torch.Tensor]]:
    """Bases by layer from `encode_bases`' names, checked against the global block's layers."""
    bases: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith("basis/"):
            layer, e = key.removeprefix("basis/").rsplit("/", 1)
            if layer not in adapters or tensor.shape[0] != adapters[layer].info.in_features:
                raise SpliceError(f"PRISM received a basis for {layer!r} of shape {tuple(tensor.shape)}, which this "
                                  "client's global block does not have (is every client running the same config?)")
            bases.setdefault(layer, {})[int(e)] = tensor
    return {layer: [each[e] for e in sorted(each)] for layer, each in bases.items()}
