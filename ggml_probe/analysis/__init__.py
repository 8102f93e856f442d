"""Analyses: pure functions and accumulators over NumPy arrays (no llama.cpp in here).

- `calibration`: accuracy, confidence, ACE (the reference study's), ECE, Brier, NLL, reliability
  diagrams, bootstrap intervals.
- `agreement`: a quant level against the reference level: answer agreement and flips, KL from
  logits, top-1 agreement, cosine similarity and linear CKA of hidden states.

Import the submodules directly (`from ggml_probe.analysis import calibration`); this package
imports nothing heavy at load.
"""
