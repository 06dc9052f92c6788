"""The `fusedattn` command line: `fusedattn info` and `fusedattn bench` (the main job)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedattn", description="fused attention kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, CPU ISA, threads, CUDA build and GPUs")
    bench_parser = commands.add_parser(
        "bench", help="time fusedattn against torch SDPA and naive torch (fwd, bwd, decode, block, lm)")
    from . import bench

    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        from ._runtime import info

        info(verbose=True)
        return 0
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
