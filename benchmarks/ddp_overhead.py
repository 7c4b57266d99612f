"""What DistributedDataParallel costs on one device: plain training against a 1-process DDP job.

Both train the product's LoRA model (apply_method "lora", r=16 on fc1/fc2, head trained in full) on
the same synthetic batch, with AdamW, at the same batch and image size; the DDP one is wrapped
exactly as the trainer wraps it (training/distributed.py: ``wrap``) in a 1-process group (NCCL on
CUDA, gloo on CPU). One process has nothing to all-reduce with, so the difference is DDP's own
machinery: gradient bucketing, the reducer's hooks and the (local) all-reduce calls. Repeats are
interleaved (plain, ddp, plain, ddp, ...) so a noisy machine hits both alike; the ratio is the number.

    PYTHONPATH=. python3 benchmarks/ddp_overhead.py --device cuda                    # convnextv2_base, 224 px, batch 64, bf16
    PYTHONPATH=. python3 benchmarks/ddp_overhead.py --device cpu --model convnextv2_atto --img-size 32 --batch-size 8 --steps 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
from torch import nn

from gi_deploy.model.adapters import apply_method
from gi_deploy.model.base import create_base_model, train_mode

NUM_CLASSES = 11
SEED = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _build(model_name: str, device: torch.device, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model, _ = create_base_model(model_name, NUM_CLASSES, pretrained=False)
    model = apply_method(model, "lora").to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_mode(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def _time_steps(model: nn.Module, opt, x, y, steps: int, warmup: int, amp: torch.dtype | None) -> float:
    """Images/s over ``steps`` forward + backward + AdamW steps after ``warmup`` untimed ones."""
    loss_fn = nn.CrossEntropyLoss()
    device = x.device

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="convnextv2_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16"],
        help="auto: bf16 autocast on CUDA, off on CPU (as the trainer)",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    amp = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # a 1-process group, as torchrun --nproc-per-node 1 would set it up
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist

    from gi_deploy.training.distributed import Dist, wrap

    if device.type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)

    rates: dict[str, list[float]] = {"plain": [], "ddp": []}
    for r in range(args.repeats):
        for variant in ("plain", "ddp") if r % 2 == 0 else ("ddp", "plain"):
            model, opt = _build(args.model, device, channels_last)
            if variant == "ddp":
                model = wrap(model, Dist(0, 1, 0, True), device)
            rates[variant].append(_time_steps(model, opt, x, y, args.steps, args.warmup, amp))
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dist.destroy_process_group()

    med = {k: statistics.median(v) for k, v in rates.items()}
    overhead = 1 - med["ddp"] / med["plain"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.model} {args.img_size}px batch {args.batch_size} on {name} "
        f"(amp {str(amp).replace('torch.', '') if amp else 'off'}, {args.steps} steps x {args.repeats} repeats)"
    )
    print(f"  plain training    {med['plain']:8.1f} img/s   (repeats: {', '.join(f'{v:.1f}' for v in rates['plain'])})")
    print(f"  DDP, 1 process    {med['ddp']:8.1f} img/s   (repeats: {', '.join(f'{v:.1f}' for v in rates['ddp'])})")
    print(f"  DDP / plain       {med['ddp'] / med['plain']:.3f}   (overhead {100 * overhead:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "device": name,
                    "img_per_s": rates,
                    "median": med,
                    "ddp_over_plain": med["ddp"] / med["plain"],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
