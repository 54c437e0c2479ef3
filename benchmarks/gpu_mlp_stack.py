"""Run-steps/s of K stacked MLP-BN-10-100 runs (the paper's CIFAR-10 MLP) at B = 8.

K members with different lr / weight decay / seed trained as one stack by the generic
engine (rankbias.training.stack.ModelStack), the step replayed from a CUDA graph on CUDA, exactly
as train_ensemble trains them minus tracking; synthetic 3x32x32 inputs (see
step_timing.py). Also prints one run's steps/s (train_run's step) for comparison.
Made for a GPU (docs/performance.md: 137,700 run-steps/s measured on an H200 at K = 256); on a CPU,
run it with a small K to check that it works:

    python benchmarks/gpu_mlp_stack.py [--k 256] [--steps 50] [--epochs 4] [--device auto]
    python benchmarks/gpu_mlp_stack.py --k 4 --steps 20 --epochs 2
"""

from __future__ import annotations

import torch
from step_timing import (
    describe,
    members,
    random_dataset,
    run_steps_per_second,
    stack_steps_per_second,
    timing_parser,
)

from rankbias.training.train import resolve_device


def main() -> None:
    args = timing_parser(__doc__, steps=50, epochs=4, k=256).parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    batch = 8
    data = random_dataset(batch * args.steps, (3, 32, 32))
    configs = members(args.k, device, model="mlp-bn-10-100", batch_size=batch)
    single, _ = run_steps_per_second(configs[0], data, args.epochs)
    stack, steps = stack_steps_per_second(configs, data, args.epochs)
    print(f"MLP-BN-10-100, B={batch}, synthetic 3x32x32, {steps} steps/epoch, "
          f"{args.epochs} timed epochs, {describe(device)}")
    print(f"one run: {single:.0f} steps/s; K={args.k} stack: {stack:.1f} stack-steps/s = "
          f"{stack * args.k:.0f} run-steps/s ({stack * args.k / single:.1f}x one run)")
    print(f"RESULT gpu_mlp_stack value={stack * args.k:.0f} target=>=100000")


if __name__ == "__main__":
    main()
