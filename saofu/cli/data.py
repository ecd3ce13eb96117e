"""`saofu data ...`: generate the Fu world, list and restore dataset versions."""

from __future__ import annotations

from pathlib import Path

import typer

from saofu.cli.common import JsonOpt, emit, progress_to_stderr
from tasks.data.fu_world import WorldConfig

app = typer.Typer(no_args_is_help=True, help="Generate and inspect datasets.")


@app.command("generate")
def data_generate(
    out: Path = typer.Option(..., "--out", help="Output folder (ImageFolder tree + manifest.csv)."),
    n: int = typer.Option(WorldConfig.n, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed"),
    size: int = typer.Option(WorldConfig.image_size, "--size", help="Image side length in pixels."),
    merchant: bool = typer.Option(False, "--merchant", help="Add the directional class fu_merchant."),
    as_json: bool = JsonOpt,
):
    """Generate the Fu world: fu / not_fu crops, fonts split between train and test."""
    from tasks.data.fu_world import generate_world

    cfg = WorldConfig(n=n, seed=seed, image_size=size, merchant=merchant)
    with progress_to_stderr(as_json):
        summary = generate_world(out, cfg, progress=lambda d, t: print(f"  {d}/{t} images", flush=True))
    info = {
        "out_dir": str(summary.out_dir),
        "manifest": str(summary.manifest),
        "counts": summary.counts,
        "train_font_groups": summary.train_font_groups,
        "test_font_groups": summary.test_font_groups,
    }
    emit(info, as_json, f"wrote {n} images to {out} (manifest {summary.manifest})")


@app.command("versions")
def data_versions(name: str | None = typer.Option(None, "--name"), as_json: bool = JsonOpt):
    """List the dataset versions (DVC) the ingest flow created."""
    from tasks.data.versions import list_versions

    versions = list_versions(name)
    rows = [v.__dict__ for v in versions]
    lines = [f"{v.id:<24} {v.n_files:>7} files  {v.created_at}  {v.md5}" for v in versions]
    emit({"versions": rows}, as_json, "\n".join(lines) or "no data versions yet")


@app.command("checkout")
def data_checkout(
    version: str = typer.Argument(..., help="A version id from `saofu data versions`, e.g. fu@v3."),
    out: Path = typer.Option(..., "--out", help="Folder to restore the files into."),
    as_json: bool = JsonOpt,
):
    """Restore exactly the files of a dataset version."""
    from tasks.data.versions import checkout_version

    with progress_to_stderr(as_json):
        path = checkout_version(version, out)
    emit({"version": version, "out_dir": str(path)}, as_json, f"restored {version} into {path}")
