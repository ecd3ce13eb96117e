"""Release: evaluation, badcases, pruning, quantization, release sets and report, steps, gate, registry."""
