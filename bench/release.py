"""`saofu bench release`: what compression buys, and how fast the serving app answers.

1. Compression: saofu_fu trained on the default Fu world (the models benchmark's budget), then the
   release flow's own variants: FP32, static INT8 (u8 activations, per-channel s8 weights), and
   channel-pruned (25 % and 50 % of hidden channels, each fine-tuned 3 epochs) in FP32 and INT8;
   accuracy on a fresh simulated online slice, onnxruntime latency p50/p95 at batch 1 on one
   thread, file size.
2. Serving: `bench.serving` (the serving app vs `mlflow models serve` of the same registered model,
   1 and 16 concurrent clients; `--no-serving` leaves it out).

Run it: `python -m bench.release --help` or `saofu bench release`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.models import SIZE, _device_name
from saofu.settings import get_settings
from tasks.data.fu_world import WorldConfig, world_folder_name
from tasks.data.loading import prepare_dataset
from tasks.release.sets import simulated_fresh_slice
from tasks.release.steps import Candidate, Variant, build_variants, choose_artefact, format_variants, measure_variants
from tasks.train.loop import TrainConfig, epoch_printer, fit

PRUNE_AMOUNTS = (0.25, 0.5)


def compression_rows(n: int, epochs: int, fresh_n: int, seed: int, tmp: Path) -> tuple[list[Variant], dict]:
    settings = get_settings()
    from tasks.train.steps import generate_fu_world

    data_dir = generate_fu_world.fn(str(settings.data_dir / world_folder_name(n, seed, SIZE)), n, seed, SIZE)
    data = prepare_dataset(data_dir, SIZE, 0.15, seed, settings.cache_dir)
    print(f"== saofu_fu: {epochs} epochs on {len(data.train)} images", flush=True)
    cfg = TrainConfig(model="saofu_fu", epochs=epochs, seed=seed, image_size=SIZE)
    result = fit(cfg, data.train, data.val, tmp / "checkpoint.pt", on_epoch=epoch_printer(epochs, prefix="  "))
    candidate = Candidate(name="bench", version="0", run_id="", checkpoint=str(tmp / "checkpoint.pt"),
                          classes=list(data.classes), image_size=SIZE, arch=result.model.arch_string,
                          data_dir=str(data_dir), data_version="")
    fresh, info = simulated_fresh_slice(tmp / "pool", list(data.classes), SIZE, fresh_n, seed)
    variants: list[Variant] = []
    for i, amount in enumerate((0.0, *PRUNE_AMOUNTS)):
        built = build_variants(candidate, data.train, data.val, tmp / f"a{i}", amount, 3, seed,
                               include_unpruned=i == 0)
        for v in built:
            if v.pruned:
                v.label = v.label.replace("pruned", f"pruned {int(amount * 100)}%")
        variants += built
    measure_variants(variants, fresh, 0.9, "not_fu")
    return variants, {"fresh": info, "train_images": len(data.train), "epochs": epochs}


ACCURACY_BAR = 0.01  # the release flow's default (ReleaseParams.accuracy_bar)


def run_release_bench(n: int = WorldConfig.n, epochs: int = TrainConfig.epochs, fresh_n: int = 1000, seed: int = 0,
                      out: str | Path = "bench/results/release.json", serving: bool = True,
                      serving_seconds: float = 10.0) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="saofu-bench-release-") as tmp:
        variants, info = compression_rows(n, epochs, fresh_n, seed, Path(tmp))
    ships = choose_artefact(variants, ACCURACY_BAR)  # what the release flow would register
    table = format_variants(variants, ships)
    print(table, flush=True)
    summary = {
        "benchmark": "release", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": _device_name(),
        "settings": {"world_n": n, "seed": seed, "threshold": 0.9, **info,
                     "latency": "onnxruntime, batch 1, one thread, 5 interleaved rounds x 200 runs per variant"},
        "compression": [asdict(v) | {"path": Path(v.path).name} for v in variants],
        "ships": ships.label if ships is not None else None, "accuracy_bar": ACCURACY_BAR,
    }
    tables = [table]
    if serving:
        from bench.serving import run_serving_bench

        served = run_serving_bench(out=Path(out).with_name("serving.json"), seconds=serving_seconds)
        summary["serving"] = served["summary"]
        tables.append(served["table"])
    summary["total_seconds"] = time.perf_counter() - started
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    tables.append(f"{summary['device']}; {summary['total_seconds']:.0f} s; written to {out}")
    return {"summary": summary, "table": "\n\n".join(tables)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=WorldConfig.n)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--fresh-n", type=int, default=1000)
    p.add_argument("--no-serving", action="store_true", help="compression only")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per serving point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/release.json")
    a = p.parse_args(argv)
    print(run_release_bench(a.n, a.epochs, a.fresh_n, a.seed, a.out, serving=not a.no_serving,
                            serving_seconds=a.seconds)["table"])


if __name__ == "__main__":
    main()
