"""Layer 5: the ecosystem: SpatialData export, LazySlide, checkpoints of the authors code."""
