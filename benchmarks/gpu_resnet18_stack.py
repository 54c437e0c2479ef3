"""Run-steps/s of K stacked ResNet-18 (width 1) runs at B = 8.

K members with different lr / weight decay / seed trained as one stack by the generic
engine (rankbias.training.stack.ModelStack, vmap over grouped convolutions), the step replayed from
a CUDA graph on CUDA, exactly as train_ensemble trains them minus tracking; synthetic
3x32x32 inputs (see step_timing.py). Made for a GPU (docs/performance.md: 901 run-steps/s measured
on an H200 at K = 32 with a graph); on a CPU, run it with a small K and few steps:

    python benchmarks/gpu_resnet18_stack.py [--k 32] [--steps 30] [--epochs 3] [--device auto]
    python benchmarks/gpu_resnet18_stack.py --k 2 --steps 3 --epochs 1 --width 0.25
"""

from __future__ import annotations

import torch
from step_timing import describe, members, random_dataset, stack_steps_per_second, timing_parser

from rankbias.training.train import resolve_device


def main() -> None:
    parser = timing_parser(__doc__, steps=30, epochs=3, k=32)
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    batch = 8
    data = random_dataset(batch * args.steps, (3, 32, 32))
    configs = members(args.k, device, model="resnet18", model_args=dict(width=args.width),
                      batch_size=batch)
    stack, steps = stack_steps_per_second(configs, data, args.epochs)
    print(f"ResNet-18 width {args.width:g}, B={batch}, synthetic 3x32x32, {steps} steps/epoch, "
          f"{args.epochs} timed epochs, {describe(device)}")
    print(f"K={args.k} stack: {stack:.2f} stack-steps/s = {stack * args.k:.1f} run-steps/s")
    print(f"RESULT gpu_resnet18_stack value={stack * args.k:.1f} target=>=400")


if __name__ == "__main__":
    main()
