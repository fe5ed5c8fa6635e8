"""Time ``kdzoo.hub.load(NAME)`` of a cached student against plain timm loading of the same file.

python tools/bench_hub_load.py [--arch resnet50] [--num_classes 100] [--reps 7]

A random ``arch`` student is exported with ``kdzoo hub export``'s code, published in a temporary
manifest through a ``file://`` mirror and downloaded once into a temporary ``$KDZOO_HOME``. Then,
in this one process and alternating, it times (a) ``kdzoo.hub.load(NAME)`` from the cache
(manifest read, cache check, model build, safetensors load) and (b) ``timm.create_model`` +
``load_state_dict(safetensors.torch.load_file(...))`` of the cached ``model.safetensors``, and
prints the median of each and their ratio. A benchmark, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import yaml
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kdzoo-bench-hub-"))
    os.environ["KDZOO_HOME"] = str(work / "home")
    os.environ["KDZOO_MANIFEST"] = str(work / "manifest.yaml")
    import kdzoo.hub
    from kdzoo.hub.export import export_checkpoint
    from kdzoo.methods import Supervised

    name = f"{args.arch}.bench"
    module = Supervised(student=args.arch, num_classes=args.num_classes, in_chans=3)
    ckpt = work / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    folder = export_checkpoint(ckpt, name, work / name)
    entry = yaml.safe_load((folder / "manifest_entry.yaml").read_text())
    entry["urls"] = [folder.as_uri()]
    Path(os.environ["KDZOO_MANIFEST"]).write_text(yaml.safe_dump({"checkpoints": [entry]}))
    cached = kdzoo.hub.download(name, progress=False) / "model.safetensors"

    def hub_load() -> torch.nn.Module:
        return kdzoo.hub.load(name)

    def timm_load() -> torch.nn.Module:
        model = timm.create_model(args.arch, num_classes=args.num_classes)
        model.load_state_dict(load_file(str(cached)))
        return model.eval()

    hub_load(), timm_load()  # warm-up: imports, allocator
    times: dict[str, list[float]] = {"kdzoo.hub.load": [], "timm + load_state_dict": []}
    for _ in range(args.reps):
        for label, fn in (("kdzoo.hub.load", hub_load), ("timm + load_state_dict", timm_load)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    size_mb = cached.stat().st_size / 1e6
    print(f"{args.arch}, {args.num_classes} classes, {size_mb:.1f} MB, {args.reps} reps, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, value in medians.items():
        print(f"  {label:<24} median {value * 1000:.1f} ms")
    ratio = medians["kdzoo.hub.load"] / medians["timm + load_state_dict"]
    print(f"  ratio kdzoo/timm {ratio:.3f}")


if __name__ == "__main__":
    main()
