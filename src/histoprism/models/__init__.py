"""Layer 3: the networks, their inputs, the registry of models, run folders loaded as predictors."""
