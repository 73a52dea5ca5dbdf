"""Command line: ``python -m paperlib reproduce | figures | lab``."""

from __future__ import annotations

import argparse
import sys


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import ParameterError, reproduce, summary_frame

    only = [n for part in (args.only or []) for n in part.split(",") if n]
    try:
        results = reproduce(args.preset, only=only or None, device=args.device,
                            execution_timeout=args.timeout)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nSummary")
    print(summary_frame(results).to_string(index=False))
    return 0 if all(r.status == "ok" for r in results) else 1


def _figures(args: argparse.Namespace) -> int:
    from .figures import regenerate

    done = regenerate()
    if not done:
        print("no completed runs in runs/: run `python -m paperlib reproduce` first", file=sys.stderr)
        return 1
    for nb, names in done.items():
        print(f"{nb}: {', '.join(names)}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    import os

    from . import paths
    from .reproduce import _kernel_env

    _kernel_env()
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={paths.notebooks_dir()}",
           "--ip=127.0.0.1", "--no-browser", *args.extra]
    os.execv(sys.executable, cmd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paperlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reproduce", help="run the notebooks headless with papermill and record the runs")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
    p.add_argument("--only", action="append", help="notebook names (comma-separated or repeated)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--timeout", type=int, default=None, help="per-cell execution timeout in seconds")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("figures", help="redraw every figure in figures/ from runs/ without training")
    p.set_defaults(func=_figures)
    p = sub.add_parser("lab", help="start JupyterLab on localhost with the project's kernel")
    p.add_argument("extra", nargs="*")
    p.set_defaults(func=_lab)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
