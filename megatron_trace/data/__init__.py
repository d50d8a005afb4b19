"""Problem sets (bundled benchmarks, local/hub training data, GPQA from CSV), prompts, and the
OpenThoughts-114k training-data builder behind tools/prepare_data.py."""

from .prepare import prepare_openthoughts
from .problems import (
    BENCHMARKS,
    Benchmark,
    load_benchmark,
    load_gpqa_csv,
    load_problems,
    math_prompt,
    peek_has_solution,
)

__all__ = ["BENCHMARKS", "Benchmark", "load_benchmark", "load_gpqa_csv", "load_problems", "math_prompt",
           "peek_has_solution", "prepare_openthoughts"]
