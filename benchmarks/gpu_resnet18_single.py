"""Steps/s of one ResNet-18 (width 1) run at B = 128, as train_run trains it.

On CUDA: channels_last, divergence counted on the device (no per-step host read), the step
replayed from a CUDA graph; tracking left out; synthetic 3x32x32 inputs (see
step_timing.py). Made for a GPU (docs/performance.md: plain PyTorch in channels_last did 107 steps/s
on an H200); on a CPU, run it with few steps:

    python benchmarks/gpu_resnet18_single.py [--steps 40] [--epochs 3] [--device auto]
    python benchmarks/gpu_resnet18_single.py --steps 2 --epochs 1 --width 0.25
"""

from __future__ import annotations

import torch
from step_timing import describe, random_dataset, run_steps_per_second, timing_parser

from rankbias.training.config import RunConfig
from rankbias.training.train import resolve_device


def main() -> None:
    parser = timing_parser(__doc__, steps=40, epochs=3)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    data = random_dataset(args.batch_size * args.steps, (3, 32, 32))
    cfg = RunConfig(model="resnet18", model_args=dict(width=args.width),
                    batch_size=args.batch_size, lr=0.05, weight_decay=5e-4, device=str(device))
    rate, steps = run_steps_per_second(cfg, data, args.epochs)
    print(f"ResNet-18 width {args.width:g}, B={args.batch_size}, synthetic 3x32x32, "
          f"{steps} steps/epoch, {args.epochs} timed epochs, {describe(device)}")
    print(f"one run: {rate:.2f} steps/s")
    print(f"RESULT gpu_resnet18_single value={rate:.2f} target=>=90")


if __name__ == "__main__":
    main()
