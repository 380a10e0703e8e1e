"""Gradient health: norms, spikes, non-finite values and per-tensor clipping."""
