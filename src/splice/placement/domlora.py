"""DomLoRA: one adapter at the dominant module instead of adapters everywhere (arXiv 2605.06183).

The paper finds that the PAGE energy of a model concentrates on one module (a shallow FFN
down-projection for 8B Llama/Qwen models), and that an adapter there alone matches or beats
LoRA on every linear layer with ~0.7% of its parameters. `DomLoRA` scores the candidates with
PAGE on probe batches when it is attached and attaches its `form` (LoRA by default; any
LoRA-shaped form such as `splice.DoRA`, `splice.DiaBlo`) at the `top_k` best modules only.

What is saved is the form's own config with the chosen modules as explicit targets, so a saved
adapter reloads without a probe (and a LoRA form stays an HF PEFT file).

    splice.attach(model, splice.DomLoRA(r=8, probe=batches))        # batches: dicts with labels
    splice train --method domlora --set top_k=2                      # probes 8 training batches
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from splice.core.config import AdapterConfig, Targets
from splice.core.errors import SpliceError
from splice.core.registry import config_from_dict, register_method
from splice.placement.page import Placement, Score, page


@register_method
@dataclass
class DomLoRA(AdapterConfig):
    """Adapters only where PAGE says an adapter can learn most.

    Attributes:
        r, alpha: rank and scale numerator of the form (alpha defaults to 2r), also the r PAGE
            scores for.
        top_k: how many modules get an adapter (the paper: 1).
        candidates: which modules compete (LoRA's target rules; default every Linear layer but
            the output head). `layers` and `exclude` restrict them further.
        form: the adapter attached at the chosen modules, as a method name or a config mapping
            (`{"method": "dora", "dropout": 0.05}`); its r/alpha come from here.
        score: "expected" (PAGE's closed form over random A) or "sampled" (one draw of A).
        probe: the probe batches (dicts the model takes, with labels), or any iterable of
            batches for `loss_fn`-free models; the trainer fills it from the training data.
        probe_batches: how many batches of `probe` to score on.
    """

    method: ClassVar[str] = "domlora"
    needs_probe: ClassVar[bool] = True
    r: int = 8
    alpha: float | None = None
    top_k: int = 1
    candidates: Targets = "all-linear"
    form: str | dict[str, Any] = "lora"
    score: Score = "expected"
    probe: Iterable[Any] | None = field(default=None, repr=False, compare=False)
    probe_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise SpliceError(f"DomLoRA top_k must be >= 1, got {self.top_k}")
        if self.probe_batches < 1:
            raise SpliceError(f"DomLoRA probe_batches must be >= 1, got {self.probe_batches}")
        self.form_config(["_check"])  # a bad form fails now, not at attach

    def form_config(self, targets: list[str]) -> AdapterConfig:
        """The form's config at `targets`, with this config's rank, scale and trained modules."""
        spec = {"method": self.form} if isinstance(self.form, str) else dict(self.form)
        own = {"r": self.r, "alpha": 2 * self.r if self.alpha is None else self.alpha}
        for key, value in own.items():
            if spec.get(key, value) != value:
                raise SpliceError(f"DomLoRA form gives {key}={spec[key]!r} but DomLoRA's {key} is {value!r} (the "
                                  f"{key} PAGE scores for); set {key} on DomLoRA and leave it out of the form")
        spec.update(own)
        config = config_from_dict(spec)
        if config.site != "layer":
            raise SpliceError(f"DomLoRA places adapters on layers; {config.method!r} edits block outputs")
        return config.replace(targets=targets, exclude=None, layers=None, train_also=list(self.train_also))

    def placement(self, model: nn.Module) -> Placement:
        if self.probe is None:
            raise SpliceError("DomLoRA needs probe batches to choose its modules: DomLoRA(probe=batches)")
        batches = (batch for i, batch in zip(range(self.probe_batches), self.probe, strict=False))
        return page(model, batches, self.candidates, self.r, alpha=self.alpha, layers=self.layers,
                    exclude=self.exclude, score=self.score)

    def placed(self, model: nn.Module) -> AdapterConfig:
        return self.form_config(self.placement(model).top(self.top_k))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("probe", None)  # data, not a setting
        return out
