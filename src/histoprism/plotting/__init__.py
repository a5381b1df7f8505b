"""Layer 3: figures (tables in, matplotlib Figure out) and the HTML report."""
