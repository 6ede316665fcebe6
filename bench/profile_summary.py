"""Summarize py-spy's collapsed stacks (``--format raw``): where the samples are.

    python -m bench.profile_summary bench-results/profiles/relay_cost-*-service.txt

Prints the top functions by self samples and by inclusive samples (a function counted once per
stack, however deep it recurses), as percentages of all samples of the given files.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def load(paths: list[Path]) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [f.strip() for f in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    return own, inclusive, total


def short(frame: str) -> str:
    return frame.replace(str(Path(sys.prefix)), "venv").replace(str(Path.cwd()) + "/", "")


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    top = 25
    own, inclusive, total = load(paths)
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples from {len(paths)} file(s)\n\nself %   function")
    for frame, n in own.most_common(top):
        print(f"{100 * n / total:6.1f}   {short(frame)}")
    print("\ninclusive %   function")
    for frame, n in inclusive.most_common(top + 15):
        print(f"{100 * n / total:6.1f}   {short(frame)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
