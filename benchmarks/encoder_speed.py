"""Forward+backward time of MONAI's ``SwinTransformer`` against medssl's fast forward, same weights.

    python benchmarks/encoder_speed.py                  # 64^3 and 96^3, tiny/base/smit, batch 1, fp32
    python benchmarks/encoder_speed.py --quick          # tiny at 32^3 and 64^3, 1 step
    python benchmarks/encoder_speed.py --device cuda --amp bf16
    python benchmarks/encoder_speed.py --presets base smit --sizes 96 --steps 3 --budget-s 240

Both models hold the same weights (MONAI's module is loaded strictly from medssl's state dict).
Steps are interleaved (MONAI, fast, MONAI, fast, ...) after one warm-up step each, so load from
other processes hits both alike; the table gives medians of wall time and, on CPU, of process CPU
time (less sensitive to a shared machine), and the ratio MONAI / fast (> 1: fast is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from medssl.config import EncoderConfig
from medssl.models import SwinEncoder


def monai_encoder(config: EncoderConfig) -> SwinTransformer:
    return SwinTransformer(
        in_chans=config.in_channels,
        embed_dim=config.feature_size,
        window_size=(config.window_size,) * 3,
        patch_size=(config.patch_size,) * 3,
        depths=config.depths,
        num_heads=config.num_heads,
        drop_path_rate=config.drop_path_rate,
        spatial_dims=3,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, process CPU seconds)."""
    model.zero_grad(set_to_none=True)
    _sync(x.device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        outs = model(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(
    preset: str, size: int, steps: int, device: torch.device, dtype: torch.dtype | None, budget_s: float | None = None
) -> dict:
    """Medians of ``steps`` interleaved steps per model; with ``budget_s``, fewer steps (at least one)
    when the warm-up steps say ``steps`` pairs would take longer than that."""
    torch.manual_seed(0)
    config = EncoderConfig(preset=preset)
    fast = SwinEncoder(config).to(device)
    reference = monai_encoder(config).to(device)
    reference.load_state_dict({k: v for k, v in fast.state_dict().items() if k != "mask_token"}, strict=True)
    x = torch.randn(1, config.in_channels, size, size, size, device=device)
    warmup = time_step(reference, x, dtype)[0] + time_step(fast, x, dtype)[0]
    if budget_s is not None:
        steps = max(1, min(steps, int(budget_s // warmup)))
    times: dict[str, list[tuple[float, float]]] = {"monai": [], "fast": []}
    for _ in range(steps):
        times["monai"].append(time_step(reference, x, dtype))
        times["fast"].append(time_step(fast, x, dtype))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    return {
        "preset": preset,
        "size": size,
        "window": config.window_size,
        "monai": med["monai"],
        "fast": med["fast"],
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (median)")
    parser.add_argument("--quick", action="store_true", help="tiny preset at 32^3 and 64^3, 1 step")
    parser.add_argument("--presets", nargs="+", default=["tiny", "base", "smit"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 96])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="per preset and size: fewer timed steps (>= 1) when the warm-up says --steps would take longer",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    presets, sizes, steps = args.presets, args.sizes, args.steps
    if args.quick:
        presets, sizes, steps = ["tiny"], [32, 64], 1
    print(
        f"device {device}, amp {args.amp}, batch 1, forward+backward, median of {steps} interleaved steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = f"{'preset':<6} {'size':>4} {'win':>3} {'steps':>5} | {'MONAI s':>8} {'fast s':>8} {'ratio':>6} |"
    header += f" {'MONAI cpu-s':>11} {'fast cpu-s':>10} {'ratio':>6}" if device.type == "cpu" else ""
    print(header)
    for preset in presets:
        for size in sizes:
            r = compare(preset, size, steps, device, dtype, args.budget_s)
            (mw, mc), (fw, fc) = r["monai"], r["fast"]
            line = f"{preset:<6} {size:>4} {r['window']:>3} {r['steps']:>5} | {mw:8.2f} {fw:8.2f} {mw / fw:6.2f} |"
            line += f" {mc:11.2f} {fc:10.2f} {mc / fc:6.2f}" if device.type == "cpu" else ""
            print(line, flush=True)


if __name__ == "__main__":
    main()
