"""Training throughput of the InceptionV3 map classifier (images/s at 299 px), Keras vs a plain PyTorch loop.

Keras path: exactly what ``wsi-pipeline train`` runs: ``pipeline.model.network.build_model`` (mixed precision on GPU
when ``--mixed-precision auto``), phase ``finetune`` from ``--unfreeze-from`` (BatchNorm frozen), ``model.fit`` on a
``MapBatches`` PyDataset of synthetic maps (numpy augmentation included). The first epoch (graph tracing / XLA
compilation) is reported separately; throughput is from the following epoch(s).

PyTorch path (when ``torch`` and ``torchvision`` import): ``torchvision.models.inception_v3`` (no aux head, random
weights), the same trainable set (stem and BatchNorm frozen, BatchNorm in eval mode), Adam, the same batches from
the same ``MapBatches`` copied to the device, ``torch.autocast`` float16 + GradScaler under mixed precision,
channels-last on GPU. Skipped with a note otherwise.

    python benchmarks/train_throughput.py                        # defaults: 299 px, batch 32 on GPU / 8 on CPU
    python benchmarks/train_throughput.py --steps 4 --batch-size 8 --epochs 2
    KERAS_BACKEND=jax python benchmarks/train_throughput.py

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Two frameworks on one GPU: neither may grab all of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

TORCH_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
# torchvision block names in the order of Keras' mixed0 ... mixed10
TORCH_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                "Mixed_7a", "Mixed_7b", "Mixed_7c")


def synthetic_maps(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    maps, y = [], np.arange(n) % 2
    for i in range(n):
        rows, cols = rng.integers(40, 90, size=2)
        fmap = rng.uniform(0, 1, size=(rows, cols, 3)).astype(np.float32)
        fmap[: rows // 8] = -1.0
        maps.append(fmap)
    return maps, y


def keras_throughput(args, maps, y) -> dict:
    import keras

    from pipeline.core.config import TrainConfig
    from pipeline.model.backend import gpu_count, use_mixed_precision
    from pipeline.model.batches import MapBatches
    from pipeline.model.network import build_model, compile_model, set_phase

    cfg = TrainConfig(input_px=args.input_px, batch_size=args.batch_size, weights=None,
                      mixed_precision=args.mixed_precision, unfreeze_from=args.unfreeze_from)
    mixed = use_mixed_precision(cfg.mixed_precision)
    keras.utils.set_random_seed(0)
    model = build_model(2, cfg, mixed_precision=mixed)
    set_phase(model, "finetune", cfg.unfreeze_from)
    compile_model(model, 1e-4)
    data = MapBatches(maps, cfg, y, np.ones(len(y), np.float32), augment=True, shuffle=True,
                      workers=args.workers, use_multiprocessing=False)
    epoch_s: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.t0)

    model.fit(data, epochs=args.epochs, verbose=0, callbacks=[Timer()])
    steady = epoch_s[1:] or epoch_s
    images = len(data) * args.batch_size
    return {"backend": keras.backend.backend(), "keras": keras.__version__, "gpus": gpu_count(),
            "mixed_precision": mixed, "jit_compile": getattr(model, "jit_compile", None),
            "trainable_weights": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "first_epoch_s": round(epoch_s[0], 2), "steady_epoch_s": [round(s, 3) for s in steady],
            "images_per_epoch": images, "images_per_s": round(images / float(np.mean(steady)), 2)}


def torch_throughput(args, maps, y) -> dict:
    try:
        import torch
        import torchvision
    except ImportError as err:
        return {"skipped": f"torch/torchvision not importable ({err.name}): install them to compare"}

    from pipeline.core.config import TrainConfig
    from pipeline.model.backend import use_mixed_precision
    from pipeline.model.batches import MapBatches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(input_px=args.input_px, batch_size=args.batch_size, mixed_precision=args.mixed_precision)
    mixed = device.type == "cuda" and use_mixed_precision(cfg.mixed_precision)
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=2)
    start = int(args.unfreeze_from[len("mixed"):])  # mixedN is torchvision block N
    trainable_blocks = set(TORCH_BLOCKS[start:]) | {"fc"}
    for name, module in model.named_children():
        for p in module.parameters():
            p.requires_grad = name in trainable_blocks
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        for p in m.parameters():
            p.requires_grad = False
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    data = MapBatches(maps, cfg, y, np.ones(len(y), np.float32), augment=True, shuffle=True)

    def step(x_np, y_np, w_np):
        x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(y_np.astype(np.int64)).to(device)
        wt = torch.from_numpy(w_np).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=mixed):
            loss = (loss_fn(model(x), yt) * wt).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    for m in bns:
        m.eval()  # frozen BatchNorm, as in the Keras model
    epoch_s = []
    for epoch in range(args.epochs):
        sync()
        t0 = time.perf_counter()
        for i in range(len(data)):
            step(*data[i])
        sync()
        epoch_s.append(time.perf_counter() - t0)
        data.on_epoch_end()
    steady = epoch_s[1:] or epoch_s
    images = len(data) * args.batch_size
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device),
            "mixed_precision": mixed, "trainable_weights": int(sum(p.numel() for p in params)),
            "first_epoch_s": round(epoch_s[0], 2), "steady_epoch_s": [round(s, 3) for s in steady],
            "images_per_epoch": images, "images_per_s": round(images / float(np.mean(steady)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-px", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (default 30 on GPU, 3 on CPU)")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up (tracing/compilation)")
    parser.add_argument("--unfreeze-from", default="mixed0", help="trainable from this block (mixed0 = whole base)")
    parser.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--workers", type=int, default=1, help="PyDataset worker threads for the Keras path")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    from pipeline.model.backend import gpu_count

    on_gpu = gpu_count() > 0
    args.batch_size = args.batch_size or (32 if on_gpu else 8)
    args.steps = args.steps or (30 if on_gpu else 3)
    maps, y = synthetic_maps(args.steps * args.batch_size)
    result = {"benchmark": "train_throughput", "input_px": args.input_px, "batch_size": args.batch_size,
              "steps_per_epoch": args.steps, "epochs": args.epochs, "unfreeze_from": args.unfreeze_from,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}
    result["keras"] = keras_throughput(args, maps, y)
    result["torch"] = {"skipped": "--skip-torch"} if args.skip_torch else torch_throughput(args, maps, y)
    if "images_per_s" in result["torch"]:
        result["keras_over_torch"] = round(result["keras"]["images_per_s"] / result["torch"]["images_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
