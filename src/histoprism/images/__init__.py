"""Layer 3: whole-slide images -> patches -> embeddings (foundation models and the offline encoder)."""
