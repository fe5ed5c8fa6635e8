"""``kdzoo hub``: export, list, download and verify published checkpoints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

__all__ = ["main"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="kdzoo hub", description="The kdzoo checkpoint hub.")
    commands = parser.add_subcommands()

    export = ArgumentParser(
        description="Export the deployable network of a kdzoo checkpoint as a hub folder."
    )
    export.add_argument("--ckpt_path", type=Path, required=True, help="a kdzoo .ckpt")
    export.add_argument("--name", type=str, required=True, help="timm arch.tag, e.g. resnet8.kd_x")
    export.add_argument("--out", type=Path, required=True, help="folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.add_argument(
        "--format",
        type=Literal["safetensors", "onnx"],
        default="safetensors",
        help="onnx: add model.onnx, checked against PyTorch with onnxruntime (kdzoo[onnx])",
    )
    commands.add_subcommand("export", export, help=export.description)

    for name, text in (
        ("list", "Print the manifest as a table."),
        ("verify", "Re-hash every cached file against the manifest."),
    ):
        sub = ArgumentParser(description=text)
        sub.add_argument("--manifest", type=Path | None, default=None, help="manifest file")
        commands.add_subcommand(name, sub, help=sub.description)

    download = ArgumentParser(description="Download (and verify) one published checkpoint.")
    download.add_argument("name", type=str, help="a manifest entry name")
    download.add_argument("--manifest", type=Path | None, default=None, help="manifest file")
    commands.add_subcommand("download", download, help=download.description)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from kdzoo import hub

    cfg = build_parser().parse_args(list(argv) if argv is not None else None)
    command = cfg.subcommand
    args = cfg[command]
    if command == "export":
        out = hub.export_checkpoint(
            args.ckpt_path, args.name, args.out, overwrite=args.overwrite, format=args.format
        )
        config = json.loads((out / "config.json").read_text())
        network = config["kdzoo"]["network"]
        print(f"exported {args.name} to {out}")
        if not network["plain_timm"]:
            print(f"not a plain timm model: {network['description']}")
        onnx = config["kdzoo"].get("onnx")
        if onnx:
            check = onnx["check"]
            print(
                f"{onnx['file']}: max |onnxruntime - torch| = {check['max_abs_diff']:.3g} on "
                f"random batches of {', '.join(map(str, check['batch_sizes']))} "
                f"(tolerance {check['tolerance']:.3g})"
            )
        print(f"load it: kdzoo.hub.load({str(out)!r}); publish it: see {out / 'README.md'}")
    elif command == "list":
        print(manifest_table(args.manifest))
    elif command == "download":
        print(hub.download(args.name, manifest_path=args.manifest))
    elif command == "verify":
        rows = hub.verify(manifest_path=args.manifest)
        for name, file, status in rows:
            print(f"{status:<12} {name}/{file}")
        bad = [row for row in rows if row[2] != "ok"]
        print(f"{len(rows) - len(bad)} ok, {len(bad)} not ok")
        if bad:
            raise SystemExit(1)


def manifest_table(manifest_path: Path | None = None) -> str:
    """The manifest as a Markdown table (also the model-zoo table of checkpoints/README.md)."""
    from kdzoo.hub.manifest import default_manifest_path, read_manifest

    entries = read_manifest(manifest_path or default_manifest_path())
    lines = [
        "| name | architecture | method | teacher | top-1 (%) | size (MB) | config |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in entries.values():
        size = sum(f.size for f in entry.files.values()) / 1e6
        top1 = (entry.metrics or {}).get("top1", "-")
        lines.append(
            f"| {entry.name} | {entry.architecture} | {entry.method} | {entry.teacher or '-'} | "
            f"{top1} | {size:.1f} | {entry.config or '-'} |"
        )
    if not entries:
        lines.append("| (no published checkpoints yet) | | | | | | |")
    return "\n".join(lines)
