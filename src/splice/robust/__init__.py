"""Robustness patches (Elytra, volume-2 §14): LoRA adapters trained by PGD adversarial training
on a frozen classifier, one per threat, switched at run time like any adapter.

    from splice.robust import LinfPGD, adversarial_patch
    result = adversarial_patch(model, (x, y), LinfPGD(eps=8/255), name="linf8", eval_data=(x_test, y_test))
    splice.activate(model, "linf8")          # or splice.route(model, ["linf8", None, ...]) per row
"""

from splice.robust.attacks import EmbeddingPGD, LinfPGD, Threat, attacked_accuracy, clean_accuracy
from splice.robust.patch import PatchResult, adversarial_patch, patch_targets

__all__ = ["EmbeddingPGD", "LinfPGD", "PatchResult", "Threat", "adversarial_patch", "attacked_accuracy",
           "clean_accuracy", "patch_targets"]
