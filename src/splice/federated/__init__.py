"""Federated fine-tuning on Flower: a ClientApp that trains splice adapters where the data is,
a ServerApp that aggregates only adapter tensors (FedAvg of A and B, or the exact mean of B A),
SecAgg+ and differential privacy from Flower, byte accounting of every message, and the
federated methods (Med-DualLoRA's local adapters; SFed-LoRA's scale is `splice.LoRA(scaling="sfed")`).

    from splice.federated import FederatedConfig, run_federated
    result = run_federated(FederatedConfig.from_yaml("examples/federated_minilm.yaml"))

CLI: `splice federate CONFIG.yaml` (simulation) or with `--superlink` (deployment engine).
Needs the `federated` extra: `pip install 'splice[federated]'`.
"""

import importlib.util
import os

from splice.core.errors import SpliceError

# No network at run time: Flower posts telemetry and checks for updates unless told not to, and
# reads these when it is first imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

if importlib.util.find_spec("flwr") is None:
    raise SpliceError("splice.federated runs on Flower, which is not installed: pip install 'splice[federated]'")

from splice.federated.config import FederatedConfig, Partition, Privacy, Secure
from splice.federated.run import FederatedResult, run_federated

__all__ = ["FederatedConfig", "FederatedResult", "Partition", "Privacy", "Secure", "run_federated"]
