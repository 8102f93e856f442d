"""Running and resuming things: evaluation runs, neuron runs, comparisons across levels, the study.

A run directory (`rundir`) is the unit of resumption and comparison: it records what produced it.
The CLI calls these modules and only parses and prints.
"""

# Prompts per llama_decode, for the API (EvalConfig, StudyConfig) and the CLI's --batch alike: several
# prompts per decode with their shared prefix decoded once (benchmarks/passes.md); 1 decodes each alone.
# Here, not in evaluation.py, so the CLI reads it without importing the pipeline.
DEFAULT_BATCH_PROMPTS = 32
