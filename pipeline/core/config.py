"""The one typed run configuration.

A YAML file (loaded with ``yaml.safe_load``) is validated into ``PipelineConfig``; unknown keys and bad values fail
with a ``ConfigError`` that names the key (``tiling.mpp: Input should be greater than 0``). Units are in the names:
``_mpp`` is microns per pixel, ``_px`` pixels at the target resolution, ``_um`` microns.

Each stage stores ``stage_hash(stage)`` with its outputs: the hash covers only the settings that change that stage's
results (the cluster size does not), so a rerun redoes exactly what a settings change made stale.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .cluster_config import ClusterConfig
from .config_section import Section
from .errors import ConfigError
from .qc_config import AnnotationsConfig, QcConfig


class TilingConfig(Section):
    mpp: float = Field(0.5, gt=0, description="target resolution of the tiles, microns per pixel")
    tile_px: int = Field(256, ge=8, le=4096, description="tile edge at the target resolution, pixels")
    stride_px: int | None = Field(None, ge=1, description="step between tiles at the target resolution; None = tile_px (no overlap)")
    mpp_override: float | None = Field(None, gt=0, description="use this level-0 mpp instead of the slide's own")
    mpp_tolerance: float = Field(0.1, ge=0, le=1, description="a slide up to this fraction coarser than the target is still accepted")
    chunk_tiles: int = Field(16, ge=1, le=256, description="tiles per task and per Zarr chunk edge (16 -> 256 tiles a task)")

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride_px is not None and self.stride_px > self.tile_px:
            raise ValueError(f"stride_px ({self.stride_px}) must not exceed tile_px ({self.tile_px})")
        return self

    @property
    def step_px(self) -> int:
        return self.stride_px or self.tile_px


class TissueConfig(Section):
    method: Literal["otsu_saturation", "otsu_od"] = Field("otsu_saturation", description="tissue detection: Otsu threshold on saturation, or on optical density")
    mask_mpp: float = Field(8.0, gt=0, description="resolution of the tissue mask, microns per pixel")
    min_saturation: float = Field(0.07, ge=0, le=1, description="floor under the Otsu threshold so blank glass stays background")
    min_od: float = Field(0.1, ge=0, description="floor under the Otsu threshold for method otsu_od")
    closing_um: float = Field(32.0, ge=0, description="morphological closing radius")
    min_object_um2: float = Field(20000.0, ge=0, description="tissue specks smaller than this are dropped")
    min_hole_um2: float = Field(20000.0, ge=0, description="holes smaller than this are filled")
    fraction_min: float = Field(0.5, ge=0, le=1, description="a tile is tissue when at least this fraction of it is")


class DescriptorConfig(Section):
    """The per-tile encoder (see pipeline/describe/encoders/). ``cnn`` and the ``cnn_*`` keys of older configs are read
    as ``keras`` with ``model``, ``weights`` and ``input_px``."""

    name: Literal["stats", "keras", "onnx", "timm", "cnn"] = Field(
        "stats", description="per-tile encoder: stats (colour, stain and texture statistics, no model); keras (a "
                             "keras.applications backbone or a saved .keras model); onnx (an encoder exported to ONNX, "
                             "run with onnxruntime); timm (a timm or hf-hub: model, needs the timm extra); cnn = keras")
    model: str | None = Field(None, description="keras: a keras.applications name (default MobileNetV2) or a .keras "
                                                "file; onnx: the .onnx file; timm: a timm model name or hf-hub:org/name")
    weights: str | None = Field("pretrained", description="'pretrained' (keras: ImageNet; timm: the model's published "
                                                          "weights from the local cache), a local weights file, or "
                                                          "null for random initialisation")
    input_px: int | None = Field(None, ge=16, le=2048, description="encoder input edge, tiles are resized to it; "
                                                                   "None = the encoder's own (keras.applications: "
                                                                   "224, ONNX: the model's fixed size, timm: its "
                                                                   "pretrained config)")
    mpp: float | None = Field(None, gt=0, description="µm/px the encoder was trained at (e.g. 0.5 for UNI); when set, "
                                                      "tiling.mpp x tiling.tile_px / input_px must match it within "
                                                      "tiling.mpp_tolerance")
    normalize: Literal["auto", "imagenet", "clip", "zero_one", "none"] = Field(
        "auto", description="pixel normalisation: auto = the encoder's own (keras.applications preprocess_input, "
                            "timm pretrained mean/std, ImageNet for ONNX, 0-255 for a saved .keras model)")
    precision: Literal["auto", "float32", "mixed"] = Field(
        "auto", description="auto = mixed float16 on a GPU, float32 on CPU")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm: keyword arguments of "
                                                                          "timm.create_model (e.g. init_values: 1e-5 "
                                                                          "and dynamic_img_size: true for UNI)")
    batch_tiles: int = Field(64, ge=1, le=4096, description="tiles per vectorised batch")
    gpu_batch_tiles: int = Field(256, ge=1, le=8192, description="tiles per batch of a learned encoder on a GPU")

    @model_validator(mode="before")
    @classmethod
    def _legacy_cnn_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in LEGACY_CNN_KEYS):
            return data
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in LEGACY_CNN_KEYS.items() if old in data}
        if data.get("name") in ("cnn", "keras"):
            if legacy.get("weights") == "imagenet":
                legacy["weights"] = "pretrained"
            data = {**legacy, **data}
        return data

    def hash_payload(self) -> dict:
        """The settings that change the descriptor values, for ``stage_hash``.

        The GPU batch size is left out; ``stats`` keeps the payload it had before the encoder keys existed
        (its stores stay current); a model or weights file enters as the SHA-256 of its content.
        """
        if self.name == "stats":
            return {"name": "stats", "batch_tiles": self.batch_tiles, **LEGACY_STATS_PAYLOAD}
        data = self.model_dump(mode="json", exclude={"gpu_batch_tiles"})
        for key in ("model", "weights"):  # a file enters by its content, not its path: a moved copy stays current
            if data[key] and Path(data[key]).is_file():
                data[key] = f"sha256:{file_sha256(data[key])}"
        return data


# old ``cnn_*`` keys -> encoder keys; the values ``stats`` hashed with before the encoder keys existed
LEGACY_CNN_KEYS = {"cnn_backbone": "model", "cnn_weights": "weights", "cnn_input_px": "input_px"}
LEGACY_STATS_PAYLOAD = {"cnn_backbone": "MobileNetV2", "cnn_weights": "imagenet", "cnn_input_px": 224}


@functools.lru_cache(maxsize=32)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, computed once per process for a given size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return _file_sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


class StainConfig(Section):
    """Stain normalisation (see pipeline/slides/stain/): each slide's stain is estimated once on its tissue at the
    tissue-mask resolution and one fixed per-slide transform maps every tile to the target before descriptors."""

    method: Literal["none", "macenko", "reinhard"] = Field(
        "macenko", description="macenko = stain vectors and concentrations in optical density (the default: it took "
                               "the lab out of the maps best, docs/design/stain.md); reinhard = CIELAB mean and "
                               "spread of the tissue; none = tiles as scanned")
    reference_slide: str | None = Field(None, description="the target is this slide's stain; None = fitted on the "
                                                          "cohort (median of the slides' estimates)")
    target: dict[str, list] | None = Field(
        None, description="the target stain itself (macenko: stain_vectors, max_concentrations; reinhard: lab_mean, "
                          "lab_std); describe writes the fitted one into OUT/config.yaml and the reducer keeps it")
    background_intensity: float | None = Field(None, gt=1, le=255, description="glass brightness Io in the optical "
                                                                               "density -ln((I + 1) / Io); None = "
                                                                               "measured per slide and channel on its "
                                                                               "glass")
    luminosity_od: float = Field(0.15, ge=0, description="pixels whose optical density norm is below that of a grey "
                                                          "pixel at this OD in every channel are not used for the "
                                                          "estimate")
    angle_percentile: float = Field(1.0, gt=0, lt=50, description="macenko: percentile of the stain angles taken "
                                                                  "as the two stain vectors")
    min_tissue_pixels: int = Field(500, ge=10, description="fewer stained pixels at the mask resolution: the slide "
                                                           "is left as it is, with a warning")

    @model_validator(mode="after")
    def _target_fits(self):
        need = {"macenko": ("stain_vectors", "max_concentrations"), "reinhard": ("lab_mean", "lab_std")}
        if self.target is not None and self.method != "none":
            missing = [k for k in need[self.method] if k not in self.target]
            if missing:
                raise ValueError(f"a {self.method} target needs {', '.join(need[self.method])} (missing "
                                 f"{', '.join(missing)})")
        return self


class ReaderConfig(Section):
    """How tile pixels are read (see pipeline/slides/readers.py). Only ``scaled_decode`` is part of the describe hash:
    the readers give the same pixels, the DCT-scaled decode does not."""

    kind: Literal["auto", "openslide", "tiff", "dicom"] = Field(
        "auto", description="auto = decode tiled TIFF slides (Aperio SVS, generic pyramidal TIFF) directly and DICOM "
                            "series through wsidicom when their probe tiles match OpenSlide, OpenSlide otherwise; "
                            "openslide = always OpenSlide; tiff = always the direct reader (slides it cannot read "
                            "fail); dicom = always wsidicom (DICOM only). DICOM series OpenSlide cannot open are "
                            "always read through wsidicom")
    scaled_decode: bool = Field(
        False, description="with the direct reader, decode JPEG tiles at 1/2, 1/4 or 1/8 in the DCT domain when the "
                           "tiles are shrunk at least that much (0.5 µm/px from a 0.25 µm/px scan): faster decoding, "
                           "pixels ~0.1-0.5 grey levels from the area average on average, but the stain-spread "
                           "descriptors (hed_std_*) move by 0.1-3 across-tile SDs, so it is off by default "
                           "(benchmarks/README.md); false = full-size decode and area averaging, OpenSlide's pixels")


class ReduceConfig(Section):
    """Descriptors -> K-component feature maps (see pipeline/reduce/)."""

    method: Literal["pca", "autoencoder"] = Field("pca", description="descriptors -> K components: PCA or a dense autoencoder")
    components: int = Field(3, ge=1, le=3, description="K: channels of the feature map (1 is replicated by train)")
    sample_tiles_per_slide: int = Field(2000, ge=10, description="tissue tiles sampled per slide for the fit, at most")
    max_sample_mb: float = Field(1024.0, gt=0, description="bound on the whole fit sample; fewer tiles per slide "
                                                          "are drawn when slides x tiles x dims would exceed it")
    incremental_above_mb: float = Field(256.0, gt=0, description="PCA: fit IncrementalPCA in batches above this "
                                                                "sample size (bounds the SVD's temporary memory)")
    seed: int = Field(0, description="seed of the tile sample and of the autoencoder")
    scale_percentiles: tuple[float, float] = Field((1.0, 99.0), description="cohort percentiles mapped to 0 and 1")
    ae_hidden_units: int = Field(64, ge=4, description="autoencoder: units of its hidden layers")
    ae_epochs: int = Field(60, ge=1, description="autoencoder: training epochs at most")
    ae_batch_size: int = Field(256, ge=8, description="autoencoder: tiles per batch")
    ae_learning_rate: float = Field(1e-3, gt=0, description="autoencoder: Adam learning rate")
    ae_validation_fraction: float = Field(0.2, gt=0, lt=0.9, description="autoencoder: share of the sample held out for early stopping")
    ae_patience: int = Field(8, ge=1, description="early stopping: epochs without a better held-out loss")

    @model_validator(mode="after")
    def _percentiles_ordered(self):
        low, high = self.scale_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"scale_percentiles must satisfy 0 <= low < high <= 100, got {self.scale_percentiles}")
        return self


# Defaults of the ``scratch`` recipe (random initialisation, trained end to end) for keys the config leaves out;
# chosen by measurement on generated cohorts of real H&E texture (docs/design/classifier.md).
SCRATCH_DEFAULTS: dict[str, Any] = {
    "head_block": "mixed2",
    "unfreeze_from": "mixed0",
    "size_strategy": "pad",
    "input_px": 96,
    "pooling": "avg",
    "crop_fraction": 1.0,  # a random crop can cut a small lesion out of a positive slide's map
    "tta": True,
}


class TrainConfig(Section):
    """InceptionV3 on the feature maps (see pipeline/model/inputs.py for the adapter and size strategies).

    ``recipe``: ``finetune`` (pretrained weights: head on a frozen base, then the top blocks at a low learning rate)
    or ``scratch`` (random weights: the network up to ``head_block`` trained end to end). ``auto`` picks ``scratch``
    when ``weights`` is null and fills the keys the config leaves out from ``SCRATCH_DEFAULTS``.
    """

    recipe: Literal["auto", "finetune", "scratch"] = Field(
        "auto", description="auto = scratch without pretrained weights, finetune with them")
    adapter: Literal["replicate", "components"] = Field("replicate", description="replicate = one component copied to 3 channels; components = 3 components as channels")
    component: int = Field(0, ge=0, le=2, description="component replicated to 3 channels when adapter=replicate")
    size_strategy: Literal["resize", "pad", "crop", "native"] = Field("resize", description="how maps become network inputs: resize, pad (whole-factor enlarge), crop, native")
    input_px: int = Field(299, ge=75, description="network input edge for resize/pad/crop (InceptionV3 needs >= 75)")
    native_min_px: int = Field(75, ge=75, description="native: smaller maps are padded to this")
    native_max_px: int = Field(1024, ge=75, description="native: larger maps are shrunk by a whole factor to fit")
    native_bucket_px: int = Field(32, ge=1, description="native: batch sizes rounded up to a multiple of this")
    weights: str | None = Field(None, description="'imagenet', a local .h5/.weights.h5 file, or null (random init)")
    label_kind: Literal["integer", "string"] = Field("integer", description="integer labels (ordinal metrics too) or strings (sorted into classes)")
    head_block: str = Field("mixed10", pattern=r"^mixed(10|[0-9])$",
                            description="InceptionV3 block the head pools (mixed10: the whole network; an earlier "
                                        "block truncates it, for random-init bases and small cohorts)")
    calibrate_batchnorm: bool = Field(False, description="random-init base: set BatchNorm statistics from the "
                                                         "training maps first (pair with an early head_block)")
    unfreeze_from: str = Field("mixed9", pattern=r"^mixed(10|[0-9])$",
                               description="first InceptionV3 block trained in phase 2 (mixed0 ... head_block)")
    batchnorm: Literal["frozen", "train"] = Field(
        "frozen", description="BatchNorm in fine-tuning: frozen (inference mode) or trained on batch statistics")
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout before the classifier layer")
    batch_size: int = Field(8, ge=1, description="maps per training batch")
    head_epochs: int = Field(20, ge=0, description="phase 1: base frozen, head trained")
    head_learning_rate: float = Field(1e-3, gt=0, description="finetune: Adam learning rate of phase 1")
    finetune_epochs: int = Field(10, ge=0, description="phase 2: blocks from unfreeze_from up trained too")
    finetune_learning_rate: float = Field(1e-5, gt=0, description="finetune: Adam learning rate of phase 2")
    patience: int = Field(5, ge=1, description="early stopping: epochs without a better validation loss")
    min_epochs: int = Field(0, ge=0, description="warm-up epochs of each phase that neither count for early stopping "
                                                 "nor can be the best epoch (a lucky early val_loss on a small "
                                                 "validation set would otherwise end training before it converged)")
    class_weights: bool = Field(True, description="weigh classes inversely to their frequency")
    augment: bool = Field(True, description="flips/rotations, crops and noise on training maps")
    crop_fraction: float = Field(0.85, gt=0, le=1, description="random crops keep at least this fraction of each side")
    noise_std: float = Field(0.02, ge=0, description="Gaussian noise on tissue values (in [0, 1] units)")
    tta: bool = Field(False, description="average predictions over the eight flips/rotations")
    val_fraction: float = Field(0.2, ge=0, lt=0.9, description="share of slides for validation (early stopping, best epoch)")
    test_fraction: float = Field(0.2, ge=0, lt=0.9, description="share of slides held out for the test metrics")
    folds: int | None = Field(None, ge=2, description="k-fold cross-validation instead of one test split")
    seed: int = Field(0, description="seed of the splits, the initialisation and the augmentation")
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description="auto = mixed float16 on GPU only")
    pooling: Literal["avg", "max"] = Field("avg", description="global pooling of the head block's features")
    epochs: int = Field(60, ge=1, description="scratch: end-to-end training epochs (best validation epoch kept)")
    learning_rate: float = Field(1e-3, gt=0, description="scratch: peak learning rate of the cosine schedule")

    @model_validator(mode="before")
    @classmethod
    def _resolve_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        recipe = data.get("recipe", "auto")
        if recipe == "auto":
            weights = data.get("weights")
            recipe = "scratch" if weights in (None, "", "none", "None", "null") else "finetune"
        data = {**data, "recipe": recipe}
        if recipe == "scratch":
            data = {**SCRATCH_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _fractions_fit(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) must stay "
                             "below 0.9 so that slides are left for training")
        if self.native_max_px < self.native_min_px:
            raise ValueError("native_max_px must not be smaller than native_min_px")
        if int(self.unfreeze_from[5:]) > int(self.head_block[5:]):
            raise ValueError(f"unfreeze_from {self.unfreeze_from} lies beyond head_block {self.head_block}: "
                             f"set unfreeze_from to {self.head_block} or an earlier block")
        return self


class CamConfig(Section):
    layer: str | None = Field(None, description="layer for Grad-CAM; None = chosen for resolution")
    class_index: int | None = Field(None, description="explain this class (model output index); None = the predicted class")
    window_overlap: float = Field(0.5, ge=0, lt=1, description="crop strategy: overlap of the windows covering a large map")
    reference: bool = Field(False, description="per position, gradient x (activation - activation of the slide's "
                                               "outline filled with its median tissue) instead of plain Grad-CAM")
    augment: bool = Field(True, description="Augmented Grad-CAM: the mean of the CAMs of the eight flips/rotations "
                                            "of the map, each turned back (8x the passes; a finer, steadier peak)")
    smooth_cells: float = Field(1.0, ge=0, description="Gaussian smoothing of the cell CAM within tissue, sigma in "
                                                       "tiles (0 = off)")
    hot_threshold: float = Field(0.6, gt=0, lt=1, description="CAM level whose regions go into the GeoJSON")
    tiff_tile_px: int = Field(256, ge=16, description="tile edge of the pyramidal heatmap TIFF")


class PipelineConfig(Section):
    tiling: TilingConfig = TilingConfig()
    tissue: TissueConfig = TissueConfig()
    descriptor: DescriptorConfig = DescriptorConfig()
    stain: StainConfig = StainConfig()
    qc: QcConfig = QcConfig()
    annotations: AnnotationsConfig = AnnotationsConfig()
    reader: ReaderConfig = ReaderConfig()
    cluster: ClusterConfig = ClusterConfig()
    reduce: ReduceConfig = ReduceConfig()
    train: TrainConfig = TrainConfig()
    cam: CamConfig = CamConfig()

    def stage_hash(self, stage: str) -> str:
        """Hash of the settings that determine a stage's outputs (stored with them; a change makes them stale)."""
        sections = STAGE_SECTIONS[stage]
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        if stage == "describe":
            payload["tiling"].pop("chunk_tiles")  # task size only, not the values
        if "descriptor" in payload:  # the encoder's identity, weights file content included
            payload["descriptor"] = self.descriptor.hash_payload()
        if "stain" in payload and self.stain.method == "none":
            payload.pop("stain")  # no normalisation: outputs made before the stain section stay current
        if "annotations" in payload:  # which classes count; the files themselves enter each slide's fingerprint
            payload["annotations"].pop("dir")
            payload["annotations"].pop("cam_classes")  # read by the CAM metrics only
            if self.annotations.dir is None:
                payload.pop("annotations")
        if "qc" in payload and not self.qc.detectors:
            payload.pop("qc")  # QC off: stores made before QC existed stay current
        if "tiling" in sections:  # the DCT-scaled decode changes the pixels (the reader kind does not)
            payload["reader"] = {"scaled_decode": self.reader.scaled_decode}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **dotted: Any) -> "PipelineConfig":
        """Copy with ``section__key=value`` overrides (``None`` values are ignored), re-validated."""
        data = self.model_dump(mode="python")
        for key, value in dotted.items():
            if value is None:
                continue
            section, name = key.split("__", 1)
            data[section][name] = value
        return config_from_dict(data, source="command line")


# Which sections each stage's output depends on (the reader does not change pixels, so it is not hashed).
STAGE_SECTIONS = {
    "describe": ("tiling", "tissue", "descriptor", "stain", "qc", "annotations"),
    "reduce": ("tiling", "tissue", "descriptor", "stain", "qc", "annotations", "reduce"),
    "train": ("tiling", "tissue", "descriptor", "stain", "qc", "annotations", "reduce", "train"),
    "cam": ("tiling", "tissue", "descriptor", "stain", "qc", "annotations", "reduce", "train", "cam"),
}


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}: {msg}")
    return f"invalid config ({source}): " + "; ".join(lines)


def config_from_dict(data: dict | None, source: str = "config") -> PipelineConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}", path=source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source), path=None) from None


def load_config(path: str | Path | None) -> PipelineConfig:
    """Load and validate a YAML config; ``None`` gives the defaults."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path, fix="Pass an existing YAML file to --config.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", path=path, fix="Correct the YAML syntax at the line shown.") from None
    return config_from_dict(data, source=str(path))


def dump_config(config: PipelineConfig) -> str:  # libyaml's safe dumper if PyYAML has it: the same text, 5x faster
    return yaml.dump(config.model_dump(mode="json"), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
