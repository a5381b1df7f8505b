"""Layer 4: run folder + cohort -> PRED folder (prediction, uncertainty, attribution)."""
