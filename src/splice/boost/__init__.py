"""Boosting adapters: BoostLoRA's rounds of TinyLoRA merged into the base (rank grows, inference
cost does not), and BoostLLM's tabular views for a language model.

    from splice.boost import boostlora
    result = boostlora(TrainConfig.from_yaml("examples/rotten_tomatoes.yaml"), rounds=8, r=1, u=4)
"""

from splice.boost.boostlora import BoostResult, BoostRound, boostlora, mined_rows
from splice.boost.rounds import BoostRounds

__all__ = ["BoostResult", "BoostRound", "BoostRounds", "boostlora", "mined_rows"]
