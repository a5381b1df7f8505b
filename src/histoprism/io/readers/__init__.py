"""Readers for the files of a cohort: spatial counts (h5ad), embedding files (h5) and 10x Space
Ranger outputs (Visium, Visium HD)."""

from .embeddings import EmbeddingFile, read_embeddings, write_embeddings
from .spaceranger import read_spaceranger, read_visium_hd
from .st import read_h5ad, read_st

__all__ = [
    "EmbeddingFile",
    "read_embeddings",
    "read_h5ad",
    "read_spaceranger",
    "read_st",
    "read_visium_hd",
    "write_embeddings",
]
