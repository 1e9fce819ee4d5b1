"""``timm``: a timm model by name or ``hf-hub:org/name``, pooled features (``num_classes=0``), run with PyTorch.

``descriptor.weights``: 'pretrained' (timm's published weights or the hub checkpoint, from the local Hugging Face
cache; offline clusters set ``HF_HUB_OFFLINE=1`` and copy the cache), a local checkpoint file (.pth, .bin,
.safetensors), or null (random). ``descriptor.timm_kwargs`` go to ``timm.create_model`` (e.g. ``init_values: 1e-5``
and ``dynamic_img_size: true`` for UNI). Tiles are resized and normalised on the device (GPU when torch sees one),
with float16 autocast on a GPU under precision auto/mixed. Needs the ``timm`` extra (torch, timm).
"""

from __future__ import annotations

import numpy as np

from ...core.config import DescriptorConfig, file_sha256
from ...core.errors import EncoderError, EncoderWeightsMissingError
from .base import NORMALISATIONS, Encoder, EncoderSpec, is_file_like, require_file, resolve_precision, worker_threads


class TimmEncoder(Encoder):
    def __init__(self, config: DescriptorConfig):
        try:
            import timm
            import torch
        except ImportError as err:
            raise EncoderError(f"descriptor.name 'timm' needs torch and timm ({err})",
                               fix="pip install 'wsi-pipeline[timm]' (torch, timm), or export the model to ONNX and "
                                   "use descriptor.name onnx.") from None
        if not config.model:
            raise EncoderError("descriptor.name 'timm' needs descriptor.model: a timm model name or hf-hub:org/name",
                               fix="Set descriptor.model, e.g. vit_base_patch16_224 or hf-hub:MahmoodLab/uni.")
        threads = worker_threads()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = self._create(timm, config)
        self.model.eval()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        input_px = config.input_px or int((cfg.get("input_size") or (3, 224, 224))[-1])
        if config.normalize == "auto":
            mean, std = cfg.get("mean") or NORMALISATIONS["imagenet"][0], cfg.get("std") or NORMALISATIONS["imagenet"][1]
            normalize = f"mean={tuple(round(v, 6) for v in mean)} std={tuple(round(v, 6) for v in std)}"
        else:
            mean, std = NORMALISATIONS[config.normalize] or ((0.0,) * 3, (1 / 255,) * 3)
            normalize = config.normalize
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        files = {"weights": file_sha256(config.weights)} if is_file_like(config.weights) else {}
        self.spec = EncoderSpec(kind="timm", model=config.model, weights=config.weights, input_px=input_px,
                                dims=int(getattr(self.model, "num_features", 0)), normalize=normalize,
                                precision=resolve_precision(config.precision, device), device=device, mpp=config.mpp,
                                file_sha256=files)

    @staticmethod
    def _create(timm, config: DescriptorConfig):
        kwargs = {"num_classes": 0, **config.timm_kwargs}
        if config.weights is None:
            return timm.create_model(config.model, pretrained=False, **kwargs)
        if is_file_like(config.weights):
            path = require_file(config.weights, "timm checkpoint")
            return timm.create_model(config.model, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                     **kwargs)
        try:
            return timm.create_model(config.model, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:  # hub/network errors are OSError subclasses
            raise EncoderWeightsMissingError(
                f"the pretrained weights of {config.model} are not in the local cache and cannot be fetched: "
                f"{str(err)[:200]}", path=config.model,
                fix="Download the checkpoint where there is network (e.g. `hf download ORG/NAME`), copy it here and "
                    "set descriptor.weights to the file (model.safetensors / pytorch_model.bin), or copy the Hugging "
                    "Face cache and set HF_HUB_OFFLINE=1.") from None

    def prepare(self, tiles: np.ndarray):
        """uint8 (n, h, w, 3) -> normalised float32 (n, 3, input_px, input_px) on the model's device."""
        torch = self.torch
        device = self.mean.device
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(device).permute(0, 3, 1, 2).float() / 255.0
        px = self.spec.input_px
        if x.shape[-1] != px or x.shape[-2] != px:
            x = torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True,
                                                align_corners=False)
        return (x - self.mean) / self.std

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = self.prepare(tiles)
            if self.spec.precision == "mixed":
                with torch.autocast(device_type=x.device.type, dtype=torch.float16):
                    out = self.model(x)
            else:
                out = self.model(x)
            return out.float().cpu().numpy()
