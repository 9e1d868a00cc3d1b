"""Choosing what trains on what: GAST's per-layer data selection (a gradient rule, `selection:`
in a training config) and SEA-PEFT's audited choice of adapter units. Importing this package
registers the gradient rules with the trainer."""

from splice.selection.gast import GAST  # noqa: F401  (registers `selection: {name: gast}`)
