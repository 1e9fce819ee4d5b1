"""Every error the pipeline raises on purpose, in one place.

Each error carries a stable machine-readable ``code`` (written to ``manifest.json``), the file it is about, and a
``fix`` sentence telling the user what to do. Errors a slide can cause are subclasses of ``SlideError``: the batch
runner records them against that slide and goes on with the others. ``ConfigError`` and ``LabelsError`` are about the
run itself and stop it before any work starts.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base of all deliberate pipeline errors."""

    code = "pipeline_error"
    default_fix = ""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.fix = fix if fix is not None else self.default_fix
        self.detail = message
        text = f"{self.path}: {message}" if self.path else message
        if self.fix:
            text = f"{text} Fix: {self.fix}"
        super().__init__(text)

    def to_record(self) -> dict:
        """The JSON-able form stored in the manifest."""
        return {"code": self.code, "message": str(self)}

    def __reduce__(self):
        # Keep errors picklable across Dask workers with their keyword-only arguments.
        return (_rebuild_error, (type(self), self.detail, self.path, self.fix))


def _rebuild_error(cls, message, path, fix):
    return cls(message, path=path, fix=fix)


# --- run-level errors: stop before any work -------------------------------------------------------------------


class ConfigError(PipelineError):
    code = "bad_config"
    default_fix = "Correct the named key in the config file (see workflows/local.yaml for a valid example)."


class LabelsError(PipelineError):
    code = "bad_labels"
    default_fix = "Correct the labels CSV: columns slide_id,label[,patient_id,split], one row per slide."


class OutputLockedError(PipelineError):
    code = "output_locked"
    default_fix = "Wait for the other run to finish, or delete the lock file if that process no longer exists."


# --- slide-level errors: recorded in the manifest, the batch goes on --------------------------------------------


class SlideError(PipelineError):
    code = "slide_error"


class UnsupportedFormatError(SlideError):
    code = "unsupported_format"
    default_fix = ("Check that the file is a whole-slide image OpenSlide reads (SVS, TIFF, NDPI, MRXS, SCN, DICOM, ...) "
                   "or a PNG/JPEG/TIFF image; remove it from the slide directory otherwise.")


class CorruptSlideError(SlideError):
    code = "corrupt_slide"
    default_fix = "Re-export or re-copy the slide from the scanner; the file is damaged or truncated."


class TileReadError(SlideError):
    code = "unreadable_tiles"
    default_fix = "Re-copy the slide (some tiles do not decode) or exclude it from the cohort."


class DirectReadUnsupportedError(SlideError):
    code = "reader_unsupported"
    default_fix = ("Use --reader auto (falls back to OpenSlide per slide) or --reader openslide; the direct TIFF reader "
                   "reads only tiled 8-bit RGB TIFF pyramids (Aperio SVS, generic pyramidal TIFF).")


class MissingMppError(SlideError):
    code = "missing_mpp"
    default_fix = "Give the scan resolution with --mpp-override MICRONS_PER_PIXEL (e.g. 0.25 for 40x, 0.5 for 20x)."


class ResolutionTooLowError(SlideError):
    code = "resolution_too_low"
    default_fix = "Choose a target --mpp at or above the slide's resolution, or correct the slide's mpp with --mpp-override."


class NoTissueError(SlideError):
    code = "no_tissue"
    default_fix = "Check the slide is not blank; lower tissue.fraction_min or tissue.min_saturation in the config."


class SlideTooSmallError(SlideError):
    code = "slide_too_small"
    default_fix = "Use a smaller --tile-px or a coarser --mpp so that at least one tile fits, or exclude the slide."


class DuplicateSlideIdError(SlideError):
    code = "duplicate_slide_id"
    default_fix = "Rename one of the files so that their names differ after sanitising (letters, digits, '.', '_', '-')."


class MissingInputError(SlideError):
    code = "missing_input"
    default_fix = "Run the earlier stage first (wsi-pipeline describe / reduce) for this slide."


class ReducerMismatchError(SlideError):
    code = "reducer_mismatch"
    default_fix = ("Describe the slide with the same descriptor settings as the reducer's cohort (see reducer.json), "
                   "or fit a new reducer on this cohort: wsi-pipeline reduce --out OUT without --reducer.")


class AnnotationError(SlideError):
    code = "bad_annotation"
    default_fix = ("Export the slide's annotations again from QuPath (File > Export objects as GeoJSON, full-resolution "
                   "pixel coordinates) as <slide_id>.geojson, or remove the file.")


class AnnotationGeometryError(AnnotationError):
    code = "annotation_geometry"
    default_fix = "Keep only Polygon and MultiPolygon annotations (with holes if needed) in the GeoJSON file."


class AnnotationOutsideSlideError(AnnotationError):
    code = "annotation_outside_slide"
    default_fix = ("Check that the GeoJSON belongs to this slide and uses level-0 pixel coordinates (QuPath's export "
                   "of the full-resolution image), not microns or another slide's pixels.")


class ReducerError(PipelineError):
    """A saved reducer that cannot be used, or a cohort a reducer cannot be fitted on (stops the reduce run)."""

    code = "bad_reducer"
    default_fix = "Fit the reducer again with `wsi-pipeline reduce --out OUT` (without --reducer)."


class ModelError(PipelineError):
    code = "model_error"


# --- the tile encoder: checked before any slide is read (a ConfigError: nothing was done) ---------------------


class EncoderError(ConfigError):
    code = "bad_encoder"
    default_fix = ("Check descriptor.name / descriptor.model (--descriptor, --encoder-model); see README "
                   "'Learned tile encoders'.")


class EncoderWeightsMissingError(EncoderError):
    code = "encoder_weights_missing"
    default_fix = "Put the named file there, or set descriptor.weights (or --encoder-model) to a local file."


class EncoderInputSizeError(EncoderError):
    code = "encoder_input_size"
    default_fix = "Leave descriptor.input_px unset (the model's own size is used) or set it to the model's input edge."


class EncoderOutputError(EncoderError):
    code = "encoder_output_shape"
    default_fix = ("Export the encoder so that it returns one pooled vector per tile, shape (n, d): e.g. the class "
                   "token or a global average pool, not the token or feature-map grid.")


# --- the viewer (wsi-pipeline view) ------------------------------------------------------------------------------


class NoRunError(PipelineError):
    code = "no_run"
    default_fix = "Pass the output directory of a run (the one with manifest.json), e.g. wsi-pipeline view demo_out."


class PortInUseError(PipelineError):
    code = "port_in_use"
    default_fix = "Choose another port with --port, or stop the program that holds it."


def error_record(exc: BaseException) -> dict:
    """Manifest record for any exception: typed errors keep their code, others are 'internal_error'."""
    if isinstance(exc, PipelineError):
        return exc.to_record()
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
