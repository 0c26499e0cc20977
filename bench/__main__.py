"""``python -m bench [SUITE...]``: run the benchmarks (all, or those named) and print their
tables of medians and ratios."""

from __future__ import annotations

import argparse

from . import forward, parse, served, server, stages

SUITES = {
    "parse": parse.main,
    "stages": stages.main,
    "server": server.cpu_suite,
    "capacity": server.capacity_suite,
    "memory": server.memory_suite,
    "bus": server.bus_suite,
    "forward": forward.suite,
    "gc": served.ramp_suite,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"which to run: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    for name in args.suites or SUITES:
        SUITES[name](quick=args.quick)


main()
