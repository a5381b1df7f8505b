"""Constants of the synthetic tissue shared by the cohort (``world``, ``tissue``, ``cohort``:
expression, embeddings) and ``images`` (H&E-like pictures): the Visium spot lattice in level-0
pixels, the niches and their nuclear density. Both sides import them from here, so neither
imports the other at load time (``cohort`` loads ``images`` lazily, only when images are asked
for)."""

from __future__ import annotations

import numpy as np

# --- geometry (Visium) ---
UM_PER_PX = 0.5  # level-0 pixel size of the cohort, µm
PITCH_UM = 100.0  # centre-to-centre spot distance
ROW_PITCH_UM = PITCH_UM * np.sqrt(3) / 2  # hex rows are closer than spots in a row

# --- niches ---
NICHES = ("tumour", "stroma", "immune", "epithelium", "necrosis", "adipose")
# nuclear density of each pure niche (NICHES order): cellular niches are dense, fat and necrosis
# are not
NUCLEAR_BY_NICHE = np.array([1.2, -0.4, 1.5, 0.4, -1.0, -1.5])

__all__ = ["NICHES", "NUCLEAR_BY_NICHE", "PITCH_UM", "ROW_PITCH_UM", "UM_PER_PX"]
