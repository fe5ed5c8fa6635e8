"""Training-step speed of kdzoo's KD against a hand-written PyTorch loop doing the same work.

Both sides train the same student (weights copied) against the same frozen teacher, on the same
pre-generated in-memory batches (a ``DataLoader`` over a ``TensorDataset``, ``num_workers=0``),
with the same optimiser (SGD, momentum 0.9), in the same process:

- kdzoo: a :class:`kdzoo.methods.KD` module driven by ``lightning.Trainer`` (no logger, no
  checkpointing, no progress bar, no validation), timed by a callback from
  ``on_train_batch_start`` of the first timed batch to ``on_train_batch_end`` of the last, so
  Trainer start-up and tear-down are excluded;
- plain: student forward + backward, teacher forward under ``torch.no_grad``,
  ``ce_weight * CE + kd_weight * T^2 * KL``, ``optimizer.step()``, timed the same way.

Repetitions alternate kdzoo and plain runs (so drift in machine load hits both), each made of
``--warmup`` untimed steps followed by ``--steps`` timed steps. The script prints images/s per
repetition, the medians, and the ratio of median step times kdzoo / plain (target <= 1.10).

    python tools/bench_speed.py                      # resnet18 <- resnet34, 64 x 3x32x32
    python tools/bench_speed.py --student test_resnet --teacher test_resnet --steps 5 --reps 2
    python tools/bench_speed.py --device cuda --json results/speed.json

``--cached`` measures what a teacher-output cache (``kdzoo cache``) saves instead: on Fashion-MNIST
views with ``augment_seed`` (real loaders, ``num_workers=0``), one epoch of ``--steps`` batches of
the student alone (``Supervised``), of online KD and of KD from a cache of the same teacher
(weights saved to a file first), interleaved, each through a fresh ``lightning.Trainer``; it prints
the ratios cached/student and online/student (target for cached <= 1.05) and the time to build
one epoch of the cache against one online KD epoch:

    python tools/bench_speed.py --cached --student resnet18 --teacher resnet34 \\
        --image-size 32 --in-chans 3
    python tools/bench_speed.py --cached --student test_resnet --teacher resnet18 \\
        --image-size 28 --in-chans 1
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdzoo.methods import KD
from kdzoo.models import TeacherSpec

TARGET_RATIO = 1.10
TARGET_CACHED_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="resnet18", help="timm name of the student")
    parser.add_argument("--teacher", default="resnet34", help="timm name of the teacher")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each side")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    parser.add_argument(
        "--cached",
        action="store_true",
        help="student alone vs online KD vs KD from a teacher cache, on Fashion-MNIST views",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--steps and --reps must be >= 1 and --warmup >= 0")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time from the start of batch ``first`` to the end of batch ``last`` (inclusive)."""

    def __init__(self, first: int, last: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, last, device
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int):
        if batch_idx == self.first:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ):
        if batch_idx == self.last:
            synchronize(self.device)
            self.end = time.perf_counter()

    @property
    def elapsed(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the timed batches did not all run")
        return self.end - self.start


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(
        TensorDataset(images, labels), batch_size=batch_size, shuffle=False, num_workers=0
    )


def run_kdzoo(
    module: L.LightningModule,
    initial_student: dict[str, torch.Tensor],
    loader: DataLoader | L.LightningDataModule,
    args: argparse.Namespace,
) -> float:
    """Seconds for ``args.steps`` training steps of ``module`` (after ``args.warmup``) through a
    fresh ``lightning.Trainer``."""
    module.student.load_state_dict(initial_student)
    device = torch.device(args.device)
    timer = StepTimer(args.warmup, args.warmup + args.steps - 1, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    if isinstance(loader, L.LightningDataModule):
        trainer.fit(module, datamodule=loader)
    else:
        trainer.fit(module, train_dataloaders=loader)
    return timer.elapsed


def run_plain(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    initial_student: dict[str, torch.Tensor],
    loader: DataLoader,
    args: argparse.Namespace,
) -> float:
    """Seconds for ``args.steps`` KD steps written in plain PyTorch."""
    device = torch.device(args.device)
    student.load_state_dict(initial_student)
    student.train()
    teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9)
    temperature = args.temperature
    first, last = args.warmup, args.warmup + args.steps - 1
    start = end = None
    for step, (images, labels) in enumerate(loader):
        if step == first:
            synchronize(device)
            start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = student(images)
        with torch.no_grad():
            teacher_logits = teacher(images)
        kl = F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        loss = (
            args.ce_weight * F.cross_entropy(logits, labels) + args.kd_weight * kl * temperature**2
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == last:
            synchronize(device)
            end = time.perf_counter()
            break
    if start is None or end is None:
        raise RuntimeError("the loader ran out before the timed steps ended")
    return end - start


def cached_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Student alone / online KD / KD from a cache: seconds per epoch of ``args.steps`` batches."""
    import tempfile

    from safetensors.torch import save_file

    from kdzoo.cache.build import build_cache
    from kdzoo.datamodules import FashionMNIST
    from kdzoo.methods import Supervised
    from kdzoo.models.backbone import Backbone

    work = Path(tempfile.mkdtemp(prefix="kdzoo-bench-cache-"))
    device = torch.device(args.device)
    samples = (args.warmup + args.steps) * args.batch_size
    data = {
        "train_subset": samples, "eval_subset": args.batch_size, "batch_size": args.batch_size,
        "image_size": args.image_size, "grey_to_rgb": args.in_chans == 3, "augment_seed": args.seed,
    }  # fmt: skip
    L.seed_everything(args.seed, verbose=False)
    teacher_file = work / "teacher.safetensors"
    teacher = Backbone(args.teacher, num_classes=10, in_chans=args.in_chans)
    save_file(teacher.model.state_dict(), teacher_file)
    optimizer = functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9)
    common = {"student": args.student, "num_classes": 10, "in_chans": args.in_chans}
    spec = {"name": args.teacher, "weights": str(teacher_file)}
    datamodule = FashionMNIST(**data)

    def module(side: str) -> L.LightningModule:
        L.seed_everything(args.seed, verbose=False)
        if side == "student":
            return Supervised(**common, optimizer=optimizer)
        cache = str(work / "cache") if side == "cached" else None
        return KD(teacher=TeacherSpec(**spec, cache=cache), **common, optimizer=optimizer)

    def build_seconds() -> float:
        shutil.rmtree(work / "cache", ignore_errors=True)
        live = module("online")
        start = time.perf_counter()
        build_cache(live, FashionMNIST(**data), work / "cache", epochs=1,
                    trainer_options={"accelerator": "gpu" if device.type == "cuda" else "cpu",
                                     "devices": 1})  # fmt: skip
        synchronize(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"student": [], "online": [], "cached": [], "build": []}
    times["build"].append(build_seconds())
    modules = {side: module(side) for side in ("student", "online", "cached")}
    initial = copy.deepcopy(modules["student"].student.state_dict())
    print(
        f"epoch of {args.steps} batches ({args.batch_size}x{args.in_chans}x{args.image_size}x"
        f"{args.image_size}, Fashion-MNIST views) after {args.warmup} warm-up: student "
        f"{args.student}, teacher {args.teacher}, {args.reps} reps, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    sides = ["student", "online", "cached"]
    for rep in range(args.reps):
        order = sides[rep % 3 :] + sides[: rep % 3]  # rotate who runs first
        for side in order:
            times[side].append(run_kdzoo(modules[side], initial, datamodule, args))
        times["build"].append(build_seconds())
        print(
            f"rep {rep + 1}/{args.reps}: "
            + "   ".join(f"{side} {times[side][-1]:.3f} s" for side in (*sides, "build"))
        )
    median = {side: statistics.median(values) for side, values in times.items()}
    ratios = {
        "cached_over_student": median["cached"] / median["student"],
        "online_over_student": median["online"] / median["student"],
        "build_epoch_over_online_epoch": median["build"] / median["online"],
    }
    paired = statistics.median(
        c / s for c, s in zip(times["cached"], times["student"], strict=True)
    )
    verdict = "OK" if ratios["cached_over_student"] <= TARGET_CACHED_RATIO else "ABOVE TARGET"
    print("medians: " + "   ".join(f"{side} {t:.3f} s" for side, t in median.items()))
    print(
        f"cached KD / student alone: {ratios['cached_over_student']:.3f} (target <= "
        f"{TARGET_CACHED_RATIO:.2f}: {verdict}); median of per-repetition ratios {paired:.3f}"
    )
    print(f"online KD / student alone: {ratios['online_over_student']:.3f}")
    print(
        "cache build (1 epoch, incl. start-up) / online KD epoch: "
        f"{ratios['build_epoch_over_online_epoch']:.3f}"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": times, "medians": median, "ratios": ratios, "paired_cached": paired,
            "load_average_at_end": load}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Trainer start-up chatter and the expected "few workers" / "eval mode" warnings.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if args.cached:
        result = cached_mode(args)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return result
    device = torch.device(args.device)

    L.seed_everything(args.seed, verbose=False)
    module = KD(
        teacher=TeacherSpec(args.teacher),
        temperature=args.temperature,
        ce_weight=args.ce_weight,
        kd_weight=args.kd_weight,
        student=args.student,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9),
    )
    initial_student = copy.deepcopy(module.student.state_dict())
    # The same networks for the plain loop: copies of kdzoo's timm student and teacher.
    plain_student = copy.deepcopy(module.student.model).to(device)
    plain_teacher = copy.deepcopy(module.teacher.backbone.model).to(device).requires_grad_(False)
    plain_initial = {k.removeprefix("model."): v for k, v in initial_student.items()}

    n_batches = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed)
    shape = (n_batches * args.batch_size, args.in_chans, args.image_size, args.image_size)
    images = torch.randn(shape, generator=gen)
    labels = torch.randint(0, args.num_classes, (shape[0],), generator=gen)
    loader = make_loader(images, labels, args.batch_size)

    times: dict[str, list[float]] = {"kdzoo": [], "plain": []}
    images_per_step = args.batch_size * args.steps
    print(
        f"KD {args.student} <- {args.teacher}, batch {args.batch_size}x{args.in_chans}x"
        f"{args.image_size}x{args.image_size}, {args.steps} timed steps after {args.warmup} "
        f"warm-up, {args.reps} reps, device {device}, {torch.get_num_threads()} threads"
    )
    for rep in range(args.reps):
        # Alternate which side goes first so neither always runs on a warmer machine.
        order = ("kdzoo", "plain") if rep % 2 == 0 else ("plain", "kdzoo")
        for side in order:
            if side == "kdzoo":
                elapsed = run_kdzoo(module, initial_student, loader, args)
            else:
                elapsed = run_plain(plain_student, plain_teacher, plain_initial, loader, args)
            times[side].append(elapsed)
        print(
            f"rep {rep + 1}/{args.reps}: kdzoo {images_per_step / times['kdzoo'][-1]:9.1f} img/s"
            f"   plain {images_per_step / times['plain'][-1]:9.1f} img/s"
        )

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:  # other processes on the machine make CPU timings noisy
        print(f"load average (1/5/15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    median = {side: statistics.median(values) for side, values in times.items()}
    ratio = median["kdzoo"] / median["plain"]
    # Each repetition runs both sides back to back, so the per-repetition ratio cancels slow
    # drift in machine load; its median is a second, more robust view of the same number.
    paired = statistics.median(k / p for k, p in zip(times["kdzoo"], times["plain"], strict=True))
    print(
        f"median:    kdzoo {images_per_step / median['kdzoo']:9.1f} img/s"
        f"   plain {images_per_step / median['plain']:9.1f} img/s"
    )
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(
        f"time ratio kdzoo/plain (medians): {ratio:.3f} (target <= {TARGET_RATIO:.2f}: {verdict})"
    )
    print(f"median of per-repetition ratios:  {paired:.3f}")

    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "seconds": times,
        "images_per_s": {
            side: [images_per_step / t for t in values] for side, values in times.items()
        },
        "median_images_per_s": {side: images_per_step / t for side, t in median.items()},
        "ratio_kdzoo_over_plain": ratio,
        "median_paired_ratio": paired,
        "load_average_at_end": load,
        "target_ratio": TARGET_RATIO,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
