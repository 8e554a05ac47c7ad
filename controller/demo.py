"""`make demo`: placeholder until the end-to-end work (issue 6) lands."""

from __future__ import annotations

import sys


def main() -> int:
    print("l3ptp demo: not available yet (the two-namespace demo arrives with the end-to-end issue)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
