"""Jobs made of several trainings: multi-tenant multiplexing (boosting, continual learning later)."""

from splice.orchestrate.multiplex import Multiplexer, multiplex

__all__ = ["Multiplexer", "multiplex"]
