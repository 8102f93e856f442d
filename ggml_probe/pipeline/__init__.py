"""Running and resuming things: evaluation runs, neuron runs, comparisons across levels, the study.

A run directory (`rundir`) is the unit of resumption and comparison: it records what produced it.
The CLI calls these modules and only parses and prints.
"""
