"""Problem sets (bundled benchmarks, local/hub training data, GPQA from CSV) and prompts."""

from .problems import BENCHMARKS, Benchmark, load_benchmark, load_gpqa_csv, load_problems, math_prompt

__all__ = ["BENCHMARKS", "Benchmark", "load_benchmark", "load_gpqa_csv", "load_problems", "math_prompt"]
