"""Layer 0: errors, names of files and keys, atomic files and locks, storage checks, progress, ranks."""
