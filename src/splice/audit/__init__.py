"""Can this adapter be trusted? Audits of an adapter folder (issue 21):

- `provenance_audit`: its SHA-256 manifest and signature (`splice.io.manifest`, `splice.io.signing`);
- `static_audit`: per-module weight-change features against benign reference adapters;
- `trigger_scan` (causal LMs) and `word_scan` (classifiers): base vs base+adapter over trigger
  sweeps, spikes flagged with their trigger;
- `contamination_test`: was it trained on this evaluation set (perplexity, Min-K% Prob, CDD, AUROC);
- `audit`: the ones asked for, in one `AuditReport` (JSON, markdown, PNGs, an exit code for CI).

Names are imported on first use, so that `import splice` does not pay for what the checks import
(scikit-learn, matplotlib).
"""

from __future__ import annotations

from splice._lazy import lazy_exports

_EXPORTS = {
    "Finding": "findings",
    "AuditReport": "report",
    "audit": "runner",
    "ScanSettings": "runner",
    "provenance_audit": "provenance",
    "ProvenanceAudit": "provenance",
    "static_audit": "static",
    "weight_profile": "static",
    "StaticAudit": "static",
    "WeightProfile": "static",
    "trigger_scan": "scan",
    "default_triggers": "scan",
    "TriggerScan": "scan",
    "word_scan": "trigger_words",
    "WordScan": "trigger_words",
    "contamination_test": "contamination",
    "item_scores": "contamination",
    "ContaminationTest": "contamination",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
