"""Peak memory of PSA's random walk on one VOC-sized image: dense transition matrix vs the grid stencil.

Each variant runs in a fresh child process on the same inputs (a 500 x 375 image at the affinity grid's stride,
``train_aff.radius`` offsets, ``refine.psa`` beta and steps, three channels = background + two classes); the child
reports its peak resident memory above what it held before the walk (``ru_maxrss``), the time, and the labels
(argmax over channels). The script prints both, the ratio grid / dense (target <= 1/10) and whether the labels
are identical; it exits with 1 if they are not.

Usage: python benchmarks/random_walk_memory.py [--params params.yaml] [--width 500] [--height 375] [--stride 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.config import load_params
from pipeline.refinement.affinity import radius_offsets
from pipeline.refinement.random_walk import grid_walk, random_walk, transition_matrix


def walk(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in this process; return its peak memory above the inputs', time and labels."""
    params = load_params(args.params)
    offsets = radius_offsets(params.train_aff.radius)
    h, w = -(-args.height // args.stride), -(-args.width // args.stride)
    generator = torch.Generator().manual_seed(0)
    affinity = torch.rand(len(offsets), h, w, generator=generator)
    seeds = torch.rand(3, h, w, generator=generator)
    beta, steps = params.refine.psa.beta, 2**params.refine.psa.logt
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if variant == "dense":
        walked = random_walk(seeds.reshape(3, -1), transition_matrix(affinity, offsets, beta), steps).reshape(3, h, w)
    else:
        walked = grid_walk(seeds, affinity, offsets, beta, steps)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    labels = walked.argmax(0).flatten().tolist()
    return {"peak_mib": peak_kib / 1024, "seconds": seconds, "grid": [h, w], "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--variant", choices=["dense", "grid"], help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(walk(args.variant, args)))
        return
    results = {}
    for variant in ("dense", "grid"):
        child = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        results[variant] = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    dense, grid = results["dense"], results["grid"]
    same = np.array_equal(dense["labels"], grid["labels"])
    h, w = dense["grid"]
    print(f"{args.width} x {args.height} image, stride {args.stride}: grid {h} x {w} = {h * w} cells")
    for name, result in results.items():
        print(f"{name:>5}: peak {result['peak_mib']:8.1f} MiB above the inputs, {result['seconds']:6.2f} s")
    print(f"grid / dense peak memory: {grid['peak_mib'] / dense['peak_mib']:.4f} (target <= 0.1)")
    print(f"labels identical: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
