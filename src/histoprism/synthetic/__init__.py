"""Layer 3: the built-in synthetic cohort (expression, embeddings, H&E-like images)."""
