"""Layer 4: cohort -> run folder (the one train entry, the loop, recipes, adapt, prompt)."""
