"""Training cost of LoRA and CoLoRA against full fine-tuning and a linear probe, side by side.

For each timm model, these variants train on the same synthetic batch at the same batch and image
size:

    full         every parameter trainable
    lora         peft LoRA exactly as the product applies it: apply_lora(model, LoraSettings())
                 (r=16, alpha=32, dropout 0.1 on fc1/fc2, head.fc trained in full)
    lora-rank    LoraSettings(dropout_position="rank"): the same dropout rate on A's r-dim output
                 instead of the full-width layer input (gi-deploy's cheaper option)
    lora-nodrop  the same with LoraSettings(dropout=0.0): peft then puts nn.Identity where the
                 Dropout was, so the gap to `lora` is what the dropout branch costs
    linear       only the classifier head.fc trainable, everything else frozen (apply_method "linear")
    colora       CoLoRA as the product applies it (apply_method "colora", ColoraSettings()): every dense
                 convolution adapted, run as one convolution with K0 + K_p*K_d, head trained in full
    colora-branch the same update as the paper's layer draws it, K0*x + K_d*(K_p*x) (forward_mode="branch")
    colora-k3    ColoraSettings(min_kernel=3): 1x1 convolutions stay frozen

LoRA variants need fc1/fc2 (ConvNeXt); CoLoRA ones need dense convolutions (ResNet, VGG, ConvNeXt's
stem/downsampling). A variant that does not apply to a model is skipped with its reason.

and the script reports, per variant, training throughput (images/s over forward + backward +
AdamW(lr 1e-4) step, timed after warm-up steps, median over repeats) and peak memory, each also
as a ratio against `full`. Models are built with random init (never downloaded); the cost does
not depend on the weights' values. Every variant is built fresh (model, optimizer, batch) for
every repeat and freed before the next one.

Peak memory: on CUDA, max_memory_allocated growth over memory_allocated after freeing the
previous variant. On CPU, the peak resident-set-size growth over the RSS measured after freeing
the previous variant, sampled from /proc/self/statm every ~5 ms by a background thread (and
cross-checked with the kernel's exact VmHWM where /proc/self/clear_refs lets it be reset);
"n/a" where /proc is absent. It covers weights, gradients, AdamW state and activations.

    python benchmarks/train_throughput.py --models convnextv2_atto --img-size 64 --steps 1 --repeats 1
    python benchmarks/train_throughput.py --img-size 224 --batch-size 8 --json /tmp/train_throughput.json
    python benchmarks/train_throughput.py --device cuda --amp --channels-last
    python benchmarks/train_throughput.py --models convnextv2_tiny --profile      # where LoRA's time goes
    python benchmarks/train_throughput.py --models resnet50 --variants full,colora,colora-branch,colora-k3,linear

Read the figures as ratios measured in one run: the repeats are interleaved (with the variant
order rotated each repeat) so that noise on a shared machine hits every variant alike. Absolute
images/s from different runs or machines are not comparable; only the ratios within one run are.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from gi_deploy.errors import ConfigError
from gi_deploy.model.adapters import apply_method
from gi_deploy.model.base import count_parameters
from gi_deploy.model.lora import apply_lora
from gi_deploy.model.settings import ColoraSettings, LoraSettings
from gi_deploy.training.trainer import resolve_device

VARIANTS = ("full", "lora", "lora-rank", "lora-nodrop", "linear", "colora", "colora-branch", "colora-k3")
COLORA_VARIANTS = {
    "colora": ColoraSettings(),
    "colora-branch": ColoraSettings(forward_mode="branch"),
    "colora-k3": ColoraSettings(min_kernel=3),
}
NUM_CLASSES = 11
LR = 1e-4
SEED = 0
MIB = 1024 * 1024
PROC_STATM = Path("/proc/self/statm")
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# ----------------------------------------------------------------------------- memory meters


def _rss_bytes() -> int:
    """Current resident set size from /proc/self/statm (second field, in pages)."""
    return int(PROC_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _hwm_bytes() -> int | None:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class CpuPeakMeter:
    """Peak RSS growth over the RSS at start(), sampled by a background thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.available = PROC_STATM.exists()
        self._baseline = 0
        self._peak = 0
        self._hwm_valid = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def start(self) -> None:
        if not self.available:
            return
        self._baseline = self._peak = _rss_bytes()
        self._hwm_valid = _reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """Peak growth in MiB, or None where /proc is absent."""
        if not self.available or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        peak = max(self._peak, _rss_bytes())
        hwm = _hwm_bytes() if self._hwm_valid else None
        if hwm is not None:  # exact kernel peak; the sampler can miss spikes shorter than 5 ms
            peak = max(peak, hwm)
        return (peak - self._baseline) / MIB


class CudaPeakMeter:
    """Peak allocated CUDA memory growth over what is allocated at start()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._baseline = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._baseline = torch.cuda.memory_allocated(self.device)

    def stop(self) -> float | None:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self._baseline) / MIB


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, to hand freed heap back to the OS so the next baseline is honest."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ----------------------------------------------------------------------------- variants


def build_model(name: str, variant: str) -> nn.Module:
    """A freshly initialised (seeded, so every variant starts from the same weights) model."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    if variant in ("full", "linear"):
        return apply_method(model, variant)
    if variant == "lora":
        return apply_lora(model, LoraSettings())
    if variant == "lora-rank":
        return apply_lora(model, LoraSettings(dropout_position="rank"))
    if variant == "lora-nodrop":
        return apply_lora(model, LoraSettings(dropout=0.0))
    if variant in COLORA_VARIANTS:
        return apply_method(model, "colora", colora=COLORA_VARIANTS[variant])
    raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")


def synthetic_batch(
    batch_size: int, img_size: int, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), y.to(device)


@dataclass
class TrainSetup:
    model: nn.Module
    step: Callable[[], None]
    trainable: int
    total: int


def make_train_setup(name: str, variant: str, args: argparse.Namespace, device: torch.device) -> TrainSetup:
    model = build_model(name, variant).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()  # dropout active, as in training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    x, y = synthetic_batch(args.batch_size, args.img_size, device, args.channels_last)
    forward = torch.compile(model) if getattr(args, "compile", False) else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = loss_fn(forward(x), y)
        loss.backward()
        optimizer.step()

    trainable, total = count_parameters(model)
    return TrainSetup(model=model, step=step, trainable=trainable, total=total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Sample:
    img_per_s: float
    peak_mib: float | None
    trainable: int
    total: int


def run_variant(
    name: str,
    variant: str,
    args: argparse.Namespace,
    device: torch.device,
    meter: CpuPeakMeter | CudaPeakMeter,
    warmup: int,
    steps: int,
) -> Sample:
    """Build, warm up, time `steps` training steps, free; memory counts everything from build on."""
    release_memory(device)
    meter.start()
    setup = make_train_setup(name, variant, args, device)
    for _ in range(warmup):
        setup.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        setup.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = meter.stop()
    sample = Sample(
        img_per_s=args.batch_size * steps / elapsed, peak_mib=peak, trainable=setup.trainable, total=setup.total
    )
    del setup
    release_memory(device)
    return sample


# ----------------------------------------------------------------------------- benchmark


@dataclass
class VariantResult:
    variant: str
    trainable: int
    total: int
    img_per_s: list[float] = field(default_factory=list)
    peak_mib: list[float | None] = field(default_factory=list)

    @property
    def median_img_per_s(self) -> float:
        return statistics.median(self.img_per_s)

    @property
    def median_peak_mib(self) -> float | None:
        known = [m for m in self.peak_mib if m is not None]
        return statistics.median(known) if known else None


def benchmark_model(
    name: str, args: argparse.Namespace, device: torch.device, meter: CpuPeakMeter | CudaPeakMeter
) -> dict[str, VariantResult]:
    results: dict[str, VariantResult] = {}
    variants = applicable_variants(name, args.variants)
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]  # rotate start each repeat
        for variant in order:
            s = run_variant(name, variant, args, device, meter, args.warmup, args.steps)
            res = results.setdefault(variant, VariantResult(variant, s.trainable, s.total))
            res.img_per_s.append(s.img_per_s)
            res.peak_mib.append(s.peak_mib)
            mem = f"{s.peak_mib:.0f} MiB" if s.peak_mib is not None else "n/a"
            print(
                f"  [{name} repeat {r + 1}/{args.repeats}] {variant:12s} {s.img_per_s:8.2f} img/s  peak {mem}",
                flush=True,
            )
    return {v: results[v] for v in variants}


def prime(name: str, args: argparse.Namespace, device: torch.device, meter: CpuPeakMeter | CudaPeakMeter) -> None:
    """One unrecorded step of every variant: one-off lazy imports, thread pools and allocator
    growth would otherwise land on whichever variant happens to run first."""
    for variant in applicable_variants(name, args.variants):
        run_variant(name, variant, args, device, meter, warmup=0, steps=1)


def applicable_variants(name: str, variants: list[str]) -> list[str]:
    """The variants that ``name`` supports (built once on the meta device: no weights allocated)."""
    usable = []
    for variant in variants:
        try:
            with torch.device("meta"):
                build_model(name, variant)
            usable.append(variant)
        except ConfigError as e:
            print(f"  [{name}] skipping {variant}: {e}", flush=True)
    return usable


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or ref == 0:
        return "n/a"
    return f"{value / ref:.2f}x"


def format_table(name: str, results: dict[str, VariantResult]) -> str:
    ref = results.get("full")
    ref_speed = ref.median_img_per_s if ref else None
    ref_mem = ref.median_peak_mib if ref else None
    total = next(iter(results.values())).total
    lines = [
        f"{name} ({total:,} params in the base model)",
        (
            f"{'variant':12s} {'trainable':>12s} {'img/s':>8s} {'spread':>7s} {'vs full':>8s} "
            f"{'peak MiB':>9s} {'vs full':>8s}"
        ),
    ]
    for res in results.values():
        speed = res.median_img_per_s
        spread = (max(res.img_per_s) - min(res.img_per_s)) / speed * 100
        mem = res.median_peak_mib
        mem_s = f"{mem:9.0f}" if mem is not None else f"{'n/a':>9s}"
        lines.append(
            f"{res.variant:12s} {res.trainable:12,d} {speed:8.2f} {spread:6.0f}% "
            f"{_ratio(speed, ref_speed):>8s} {mem_s} {_ratio(mem, ref_mem):>8s}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- profile mode


def profile_variant(name: str, variant: str, args: argparse.Namespace, device: torch.device) -> None:
    """Top ops by self time over a few profiled training steps of one variant."""
    from torch.profiler import ProfilerActivity, profile

    setup = make_train_setup(name, variant, args, device)
    for _ in range(max(args.warmup, 1)):
        setup.step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            setup.step()
        _sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"\nprofile: {name} / {variant}, {args.profile_steps} training steps "
        f"(batch {args.batch_size}, {args.img_size}px), top 15 ops by {sort_by}"
    )
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=40))


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="convnextv2_tiny,convnextv2_base",
        help="comma-separated timm model names (random init, never downloaded)",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (meant for CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each variant's model (the compile runs in the warm-up steps, which are not timed)",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write results as JSON")
    ap.add_argument(
        "--profile", action="store_true", help="instead of the benchmark, profile one variant on the first model"
    )
    ap.add_argument("--profile-variant", default="lora", choices=VARIANTS)
    ap.add_argument("--profile-steps", type=int, default=2)
    args = ap.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; use {','.join(VARIANTS)}")
    for opt in ("img_size", "steps", "repeats", "profile_steps"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "amp": args.amp,
        "channels_last": args.channels_last,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = 32 if device.type == "cuda" else 8
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args, device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    if args.profile:
        profile_variant(args.models[0], args.profile_variant, args, device)
        return

    meter: CpuPeakMeter | CudaPeakMeter = CudaPeakMeter(device) if device.type == "cuda" else CpuPeakMeter()
    if device.type == "cpu" and not meter.available:
        print("note: /proc/self/statm absent, peak memory reported as n/a")
    if not args.compile:  # compiled variants compile in their own warm-up steps; priming would compile twice
        prime(args.models[0], args, device, meter)
    tables, records = [], {}
    for name in args.models:
        results = benchmark_model(name, args, device, meter)
        tables.append(format_table(name, results))
        records[name] = {
            v: {**asdict(r), "median_img_per_s": r.median_img_per_s, "median_peak_mib": r.median_peak_mib}
            for v, r in results.items()
        }
    print(
        f"\ntraining step = forward + backward + AdamW(lr {LR:g}); img/s and peak MiB are medians "
        f"over {args.repeats} interleaved repeats of {args.steps} steps after {args.warmup} warm-up; "
        "spread = (max - min) / median img/s"
    )
    for table in tables:
        print("\n" + table)
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "results": records}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
