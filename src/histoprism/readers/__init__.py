"""Readers for the files of a cohort: spatial counts (h5ad) and embedding files (h5)."""

from .embeddings import EmbeddingFile, read_embeddings
from .st import read_h5ad, read_st

__all__ = ["EmbeddingFile", "read_embeddings", "read_h5ad", "read_st"]
