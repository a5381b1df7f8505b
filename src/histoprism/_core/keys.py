"""Names of files, HDF5 datasets and AnnData slots, in one place.

Readers and writers import these; a layout changes here or nowhere.
"""

# --- cohort directory (docs/formats.md) -------------------------------------------------------
METADATA_FILES = ("metadata.csv", "HEST_v1_1_0.csv")
ST_DIR = "st"  # st/{id}.h5ad: raw counts
EMBEDDINGS_DIR = "embeddings"  # embeddings/{encoder}/{id}.h5
PATCHES_DIR = "patches"  # patches/{id}.h5 (HEST)
WSI_DIR = "wsis"  # wsis/{id}.{tif,svs,...}
WSI_SUFFIXES = (
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".png",
    ".jpg",
    ".jpeg",
)
SPLITS_DIR = "splits"  # splits/{train,val,test}_split.csv
CEILING_DIR = "ceiling"  # synthetic cohorts only: ceiling/{id}.h5ad, attainable expectation
SPLIT_NAMES = ("train", "val", "test")

# metadata.csv columns
META_ID = "id"
META_CANCER = "oncotree_code"
META_CANCER_FILLED = "oncotree_code_filled"
META_PATIENT = "patient"
META_ORGAN = "organ"
META_TECH = "st_technology"
META_PIXEL_SIZE = ("pixel_size_um_embedded", "pixel_size_um_estimated")
META_WSI = "wsi_path"  # image of the slide, written by `histoprism import --image`
SPLIT_ID = "sample_id"
UNKNOWN_CANCER = "Unknown"

# --- embedding h5 -----------------------------------------------------------------------------
H5_FEATURES = "features"  # (N, D) float
H5_FEATURES_ALT = ("embeddings",)  # HEST-bench name
H5_COORDS = "coords"  # (N, 2) spot centres (ours) or patch top-left (TRIDENT), level-0 px
H5_BARCODES = "barcodes"  # (N,) bytes or str
H5_BARCODES_ALT = ("barcode",)
TORCH_EMBEDDINGS_SUFFIX = "_embeddings.pt"  # HistoPrism repository: {id}_embeddings.pt
H5_ATTR_ENCODER = "encoder"  # attrs of embeddings written by `histoprism extract`
H5_ATTR_MPP = "target_mpp"
H5_ATTR_PATCH_PX = "patch_size"
H5_ATTR_SOURCE = "source"  # "patches" | "wsi": what `histoprism extract` embedded
H5_ATTR_COORDS_ARE = "coords_are"  # written by every writer: what ``coords`` holds

# --- HEST patches/{id}.h5 and metadata/{id}.json --------------------------------------------------
HEST_METADATA_DIR = "metadata"  # metadata/{id}.json (may hold bare NaN)
PATCH_IMG = "img"  # (N, H, W, 3) uint8
PATCH_COORDS = "coords"  # (N, 2) int64 top-left corner, level-0 px
PATCH_BARCODE = "barcode"  # (N, 1) bytes
PATCH_ATTR_PIXEL_SIZE = "pixel_size"  # µm per pixel of img

# --- AnnData slots ----------------------------------------------------------------------------
OBSM_SPATIAL = "spatial"  # (N, 2) spot centres, level-0 pixels (x, y)
OBSM_PATHWAYS = "pathways"  # (N, S) predicted pathway activity
OBSM_PATHWAYS_SD = "pathways_sd"  # (N, S) its predictive sd (predict --uncertainty)
LAYER_SD = "sd"  # layers['sd'] (N, G) predictive sd of the measured log1p(counts)
LAYER_BOUNDS = ("q025", "q10", "q90", "q975")  # layers: central 95 % and 80 % interval bounds
# factorised predictions: X = max(hidden @ head.T + bias, 0), multiplied out when read
OBSM_HIDDEN = "histoprism_hidden"  # (N, H) the model's last hidden layer
VARM_HEAD = "histoprism_head"  # (G, H) weights of its linear head
VAR_HEAD_BIAS = "histoprism_bias"  # (G,) bias of its linear head
OBS_CANCER = "oncotree_code"
OBS_PROMPT = "prompt"  # bool: its measured counts were given to the model (--prompt-fraction)
OBS_ARRAY_ROW, OBS_ARRAY_COL = "array_row", "array_col"  # Space Ranger grid position of a spot
VAR_GENE_IDS = "gene_ids"
VAR_GENE_SYMBOLS = "gene_symbols"  # as sc.pl.* gene_symbols= names it
UNS_HISTOPRISM = "histoprism"
# keys of uns['histoprism'] that describe the slide, not the run (per_slide.csv, not "model")
UNS_SLIDE_FACTS = ("cancer_requested", "pixel_size_um")
UNS_SPATIAL = "spatial"  # {library_id: {images, scalefactors, metadata}}, as Space Ranger/scanpy
UNS_PATHWAY_NAMES = "pathway_names"
UNITS_LOG1P = "log1p(counts)"

# --- run directory ----------------------------------------------------------------------------
RUN_WEIGHTS = "model.safetensors"
RUN_CONFIG = "config.json"
RUN_HISTORY = "history.csv"
RUN_LAST = "last"  # last/{model,best,optimizer}.safetensors + last/state.json
RUN_NOISE = "noise.safetensors"  # per-gene count noise fitted on the validation slides
RUN_PROMPT = "prompt.safetensors"  # the prompt head of `train --init RUN --prompt` (prompt.py)

# --- evaluation directory ---------------------------------------------------------------------
EVAL_METRICS = "metrics.json"
EVAL_PER_SLIDE = "per_slide.csv"
EVAL_PER_GENE = "per_gene.csv"
EVAL_PER_PATHWAY = "per_pathway.csv"
EVAL_CALIBRATION = "calibration.csv"  # reliability curve, when predictions carry layers['sd']
EVAL_REPORT = "report.html"
EVAL_SPATIAL_MAPS = "spatial_maps.h5"  # the report's spatial examples, drawn again by `report`

# --- headline metrics: EVAL/metrics.json "headline" (docs/metrics.md) ------------------------------
# name -> (short label for tables, one-line description). Custom gene-set collections add
# gpc_<collection>_micro/_macro beside the bundled two.
HEADLINE_METRICS: dict[str, tuple[str, str]] = {
    "hvg_micro": (
        "HVG-50 micro",
        "HVG-50: mean r over the cancer type's 50 HVGs, mean over slides",
    ),
    "hvg_macro": (
        "HVG-50 macro",
        "HVG-50, mean over cancer types of the mean over their slides",
    ),
    "gpc_hallmark_micro": (
        "GPC Hallmark micro",
        "GPC hallmark: mean over gene sets of s_m (mean over slides)",
    ),
    "gpc_hallmark_macro": (
        "GPC Hallmark macro",
        "GPC hallmark: mean over gene sets of s_m (mean over cancer types)",
    ),
    "gpc_go_micro": ("GPC GO micro", "GPC go: mean over gene sets of s_m (mean over slides)"),
    "gpc_go_macro": ("GPC GO macro", "GPC go: mean over gene sets of s_m (mean over cancer types)"),
    "all_genes_micro": ("all genes", "all measured genes: mean r per slide, mean over slides"),
    "all_genes_macro": ("all genes macro", "all measured genes, mean over cancer types"),
    "pooled_pearson": (
        "pooled r",
        "HEST-bench protocol: r per gene over all test spots pooled, mean over genes",
    ),
}

# --- benchmark directory ----------------------------------------------------------------------
COMPARE_TABLE = "comparison.csv"
COMPARE_JSON = "comparison.json"
COMPARE_MD = "comparison.md"
BENCH_TIMING = "timing.json"
