"""Steps per second vs batch size from `benchmarks/gpu.py --json` files (a GPU's and a CPU's),
drawn on one log-log figure: where the GPU is launch-bound (flat steps/s), where TF32 and a CUDA
graph of the step would pay, and how far the CPU is below.

    python benchmarks/gpu_figure.py GPU.json CPU.json -o steps_per_second.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(doc: dict, engine: str, matmul: str) -> tuple[list[int], list[float]]:
    rows = sorted((r["batch_size"], r["samples_per_s"] / r["batch_size"]) for r in doc["mlp"]
                  if r["engine"] == engine and r["matmul"] == matmul)
    return [b for b, _ in rows], [s for _, s in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gpu", type=Path)
    ap.add_argument("cpu", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("steps_per_second.png"))
    args = ap.parse_args()
    gpu, cpu = (json.loads(p.read_text()) for p in (args.gpu, args.cpu))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for doc, engine, matmul, label, style in (
            (gpu, "fused", "fp32", f"{gpu['device']}, fused, fp32", "o-"),
            (gpu, "fused", "tf32", f"{gpu['device']}, fused, TF32", "s--"),
            (gpu, "autograd", "fp32", f"{gpu['device']}, autograd, fp32", "^:"),
            (cpu, "fused", "fp32", "CPU, one core, fused, fp32", "o-")):
        b, s = series(doc, engine, matmul)
        ax.loglog(b, s, style, label=label)
    graphs = [g for g in gpu.get("cuda_graphs", []) if "graph_samples_per_s" in g]
    if graphs:
        ax.loglog([g["batch_size"] for g in graphs],
                  [g["graph_samples_per_s"] / g["batch_size"] for g in graphs], "D-",
                  label=f"{gpu['device']}, fused step as one CUDA graph")
    ax.set_xlabel("batch size")
    ax.set_ylabel("SGD steps per second")
    ax.set_title("MLP 784-1024-1024-10: steps/s vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
