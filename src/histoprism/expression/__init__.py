"""Layer 1: gene panels and gene sets, pathway scores, per-gene correlation: pure numerics on tables."""
