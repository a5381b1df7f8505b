"""Layer 2: every folder format (cohort, run, PRED, EVAL) and every reader, for producers and consumers alike."""
