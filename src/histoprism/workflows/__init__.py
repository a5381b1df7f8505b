"""Layer 5: train + predict + evaluate composed (benchmark, leave-one-cancer-out, demo)."""
