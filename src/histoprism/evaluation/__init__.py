"""Layer 4: PRED + cohort -> EVAL folder; judges any method, imports no model."""
