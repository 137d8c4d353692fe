"""Fine-tuning step time of medssl's segmenter vs MONAI's own SwinUNETR, measured in one run.

    python benchmarks/finetune_step.py [--size 64] [--preset tiny] [--batch 2] [--steps 5] [--device cpu]

Both networks get the same input, DiceCE loss and the training loop's own step (``train_step``); the
ratio medssl/MONAI is printed (≈1.0 expected: the segmenter is MONAI's SwinUNETR with the encoder swapped for a
subclass).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.models import SwinSegmenter
from medssl.train.step import build_optimisation, time_train_steps
from medssl.training_module import TrainingHooks


class Segmentation(TrainingHooks):
    """Either network as a training module: DiceCE on its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, batch: dict, step: int) -> dict:
        return {"loss": self.loss_fn(self.model(batch["image"]), batch["label"])}


def time_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per training step (the loop's own ``train_step``, fine-tuning schedule defaults, fp32)."""
    module = Segmentation(model)
    schedule = FinetuneConfig().schedule.model_copy(update={"amp": "off", "steps": warmup + steps})
    opt = build_optimisation(module, schedule, schedule.steps, x.device)
    return time_train_steps(opt, {"image": x, "label": y}, steps, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = EncoderConfig(preset=args.preset, window_size=args.window)
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, device=dev)
    y = torch.randint(0, args.classes, (args.batch, 1, args.size, args.size, args.size), device=dev)
    ours = SwinSegmenter(cfg, args.classes, crop_size=args.size, norm="instance").to(dev)
    monai = SwinUNETR(
        in_channels=1,
        out_channels=args.classes,
        feature_size=cfg.feature_size,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
    ).to(dev)
    results = {}
    for _ in range(2):  # interleave to share any drift in machine load
        results.setdefault("medssl", []).extend(time_steps(ours, x, y, args.steps))
        results.setdefault("monai", []).extend(time_steps(monai, x, y, args.steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"device {dev}, preset {args.preset} (window {cfg.window_size}), input {args.batch}x1x{args.size}^3, "
        f"threads {torch.get_num_threads()}"
    )
    for name, t in med.items():
        print(f"  {name:7s} fine-tuning step: {t * 1000:8.1f} ms (median of {len(results[name])})")
    print(f"  ratio medssl/monai: {med['medssl'] / med['monai']:.3f}")


if __name__ == "__main__":
    main()
