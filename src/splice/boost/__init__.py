"""Boosting adapters: BoostLoRA's rounds of TinyLoRA merged into the base (rank grows, inference
cost does not), and BoostLLM's rounds of LoRA + head over a table read as text.

    from splice.boost import boostlora, boostllm
    result = boostlora(TrainConfig.from_yaml("examples/rotten_tomatoes_boostlora.yaml"), rounds=8, r=2, u=4)
    table = load_table("breast_cancer")
    scores = boostllm("smollm2", table, draw_shots(table, shots=16, seed=0), rounds=3).test
"""

from splice.boost.boostllm import BoostLLM, BoostLLMSettings
from splice.boost.boostlora import BoostResult, BoostRound, BoostSettings, boostlora, mined_rows
from splice.boost.rounds import BoostRounds
from splice.boost.tabular import Table, draw_shots, load_table
from splice.boost.tabular_llm import TabularResult, boostllm

__all__ = ["BoostLLM", "BoostLLMSettings", "BoostResult", "BoostRound", "BoostRounds", "BoostSettings", "Table",
           "TabularResult", "boostllm", "boostlora", "draw_shots", "load_table", "mined_rows"]
