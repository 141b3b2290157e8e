"""`python -m wizardcoder_plugin.kernels build`: build the native CPU kernels now, into the kernel cache, so a
first `zoo predict` finds them instead of waiting for the compiler (scripts/setup.sh runs it at install, as a
package with compiled extensions builds them when it installs)."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wizardcoder_plugin.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build"], help="build (or find) the library for this machine")
    ap.parse_args(argv)
    from . import KernelUnavailable, build, cache_dir

    started = time.perf_counter()
    try:
        library = build()
    except KernelUnavailable as exc:
        print(f"error: {exc}\nhint: install g++ (or set CXX); without the native kernels MindSpore's run instead",
              file=sys.stderr)
        return 2
    print(f"{library} ({time.perf_counter() - started:.1f} s; cache {cache_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
