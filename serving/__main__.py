"""``python -m serving [--repo PATH] [--host H] [--port P]``: run the feature server."""

from __future__ import annotations

import argparse
import logging
import sys

from featurepipe.errors import FeaturepipeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--repo", default=None, help="feature repo folder (default: ./feature_repo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6566, help="port (0: any free port)")
    parser.add_argument("--max-workers", type=int, default=8, help="request threads")
    parser.add_argument("--max-rows", type=int, default=1000, help="most entity rows per request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.server import serve

    try:
        serve(args.repo, host=args.host, port=args.port, max_workers=args.max_workers,
              max_rows=args.max_rows, announce=lambda line: print(line, file=sys.stderr, flush=True))
    except FeaturepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
