"""`l3ptp-controller --config PATH`: run the controller until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from l3ptp.ipc.constants import CONFIG_DEFAULT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l3ptp-controller", description="Run the l3ptp controller.")
    parser.add_argument("--config", default=CONFIG_DEFAULT, help=f"configuration file (default {CONFIG_DEFAULT})")
    args = parser.parse_args(argv)

    from l3ptp.controller.app import serve
    from l3ptp.controller.config import ConfigError
    from l3ptp.controller.helper_client import HelperError
    from l3ptp.ipc.logsetup import configure

    configure("controller")
    try:
        return asyncio.run(serve(args.config))
    except ConfigError as exc:
        print(f"l3ptp-controller: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except HelperError as exc:
        print(f"l3ptp-controller: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # prctl refused, runtime directory or socket unusable
        print(f"l3ptp-controller: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
