"""DMEP's claim about where routing is skewed, checked on a run's RUN/dmep.json: per module type
(q_proj, ..., o_proj, gate_proj, ...), how concentrated the training tokens' routing was when
DMEP pruned (top expert's share of the routed slots, the slots' entropy over log E) and how many
experts it removed. The paper: skewed in attention output projections, near-uniform in MLP
projections.

    python bench/dmep_module_types.py runs/smollm2-moelora-dmep [--routing DIR/routing.json] [--note "..."]

With `--routing` (what `splice analyze` wrote for the run's final adapter), the same numbers of
the trained, pruned adapter's routing too. Writes dmep_module_types.json and .md. Measures
nothing itself: it reads the run's record.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from common_report import RESULTS, table, write_results


def module_types(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per module type: modules, mean top share, mean normalised entropy of the routed slots, and
    experts removed (of the routed experts of all its modules)."""
    grouped: dict[str, list[tuple[list[float], int]]] = defaultdict(list)
    for module, shares in record["usage"].items():
        grouped[module.rsplit(".", 1)[-1]].append((shares, len(record["keep"][module])))
    out = {}
    for kind, entries in grouped.items():
        experts = len(entries[0][0])
        entropies = [-sum(p * math.log(p) for p in shares if p > 0) / math.log(experts) for shares, _ in entries]
        out[kind] = {"modules": len(entries), "experts": experts,
                     "top_share": sum(max(shares) for shares, _ in entries) / len(entries),
                     "normalised_entropy": sum(entropies) / len(entries),
                     "experts_removed": sum(experts - kept for _, kept in entries),
                     "removed_share": sum(experts - kept for _, kept in entries) / (experts * len(entries))}
    return out


def after_training(routing: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per module type, from `splice analyze`'s routing.json: mean top share of the routed slots,
    mean slots' entropy over log E (of the experts kept), and the mean router entropy per token."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for module in routing["modules"]:
        grouped[module["name"].rsplit(".", 1)[-1]].append(module)
    out = {}
    for kind, modules in grouped.items():
        slots = [-sum(p * math.log(p) for p in m["utilisation"] if p > 0) / math.log(m["experts"]) for m in modules]
        out[kind] = {"top_share": sum(m["top_share"] for m in modules) / len(modules),
                     "slots_entropy": sum(slots) / len(modules),
                     "router_entropy": sum(m["normalised_entropy"] for m in modules) / len(modules),
                     "experts": sum(m["experts"] for m in modules) / len(modules)}
    return out


def markdown(result: dict[str, Any]) -> str:
    kinds = result["module_types"]
    rows = [[kind, str(v["modules"]), f"{v['top_share']:.3f}", f"{v['normalised_entropy']:.3f}",
             f"{v['experts_removed']} ({v['removed_share']:.0%})"]
            for kind, v in sorted(kinds.items(), key=lambda kv: kv[1]["normalised_entropy"])]
    removed = result["parameters_removed"]
    before = sum(v["before"] for v in removed.values())
    after = sum(v["after"] for v in removed.values())
    lines = [
        "# DMEP on a real run: routing skew and pruning by module type", "",
        f"Run `{result['run']}`: pruned at step {result['step']} with keep_mass {result['keep_mass']}; "
        f"adapter parameters {before:,} -> {after:,} ({1 - after / before:.1%} fewer).",
        *([result["note"]] if result.get("note") else []), "",
        "Top share: the most used expert's share of a module's routed slots during phase 1 (1/E uniform, "
        "1/top_k when one expert is in every token's top-k); entropy: of the slots' distribution over log E "
        "(1 uniform). Mean over the modules of each type, most skewed first.", "",
        table(["module type", "modules", "top share", "entropy / log E", "experts removed"], rows), "",
    ]
    attention = [k for k in kinds if k in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [k for k in kinds if k in ("gate_proj", "up_proj", "down_proj")]
    if attention and mlp:
        mean = lambda names, key: sum(kinds[k][key] for k in names) / len(names)  # noqa: E731
        lines += [f"Attention projections: entropy {mean(attention, 'normalised_entropy'):.3f}, "
                  f"{mean(attention, 'removed_share'):.0%} of experts removed; MLP projections: entropy "
                  f"{mean(mlp, 'normalised_entropy'):.3f}, {mean(mlp, 'removed_share'):.0%} removed. "
                  f"o_proj: entropy {kinds['o_proj']['normalised_entropy']:.3f}, "
                  f"{kinds['o_proj']['removed_share']:.0%} removed.", ""]
    if result.get("after_training"):
        after = result["after_training"]
        rows = [[kind, f"{v['experts']:.2f}", f"{v['top_share']:.3f}", f"{v['slots_entropy']:.3f}",
                 f"{v['router_entropy']:.3f}"]
                for kind, v in sorted(after.items(), key=lambda kv: -kv[1]["top_share"])]
        lines += ["## The trained, pruned adapter's routing", "",
                  f"`splice analyze` over {result['routing_texts']} test texts: experts kept per module, top share "
                  "and entropy of the routed slots (over log of the experts kept), and the routers' mean per-token "
                  "probability entropy over log E. Most skewed first.", "",
                  table(["module type", "experts kept", "top share", "slots entropy / log E",
                         "router entropy / log E"], rows), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run folder with dmep.json")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--note", help="a sentence on how the run was made, printed in the report")
    p.add_argument("--routing", type=Path, help="routing.json of `splice analyze` on the run's adapter")
    args = p.parse_args()
    record = json.loads((args.run / "dmep.json").read_text())
    result = {"run": str(args.run), "step": record["step"], "keep_mass": record["keep_mass"], "note": args.note,
              "parameters_removed": record["parameters_removed"], "module_types": module_types(record)}
    if args.routing:
        routing = json.loads(args.routing.read_text())
        result |= {"after_training": after_training(routing), "routing_texts": routing["texts"]}
    write_results(args.out_dir, "dmep_module_types", result, markdown(result))


if __name__ == "__main__":
    main()
