"""Command line: ``python -m paperlib reproduce | figures | levene | lab | train``."""

from __future__ import annotations

import argparse
import sys


def cli_parameters(names: list[str], data_dirs: list[str] | None = None, settings: list[str] | None = None,
                   notebooks: list[str] | None = None) -> dict[str, dict[str, object]]:
    """Per-notebook parameters from ``--data-dir [NOTEBOOK=]DIR`` and ``--set [NOTEBOOK:]NAME=VALUE`` options.

    Without a ``NOTEBOOK`` prefix an option applies to every notebook in ``names``; a ``VALUE`` is parsed as
    JSON when it parses (``3``, ``[0, 1]``, ``true``), else kept as a string. In ``--data-dir`` a word before
    ``=`` (no ``/``) is a notebook name: it must name one of ``names`` (``notebooks``: all notebooks, to say
    which exist); a folder whose name holds ``=`` is given with a ``/`` (``./a=b``). Raises ``ParameterError``
    naming the bad option."""
    import json
    import re

    from .reproduce import RESERVED, ParameterError

    out: dict[str, dict[str, object]] = {n: {} for n in names}

    def targets(prefix: str | None, option: str) -> list[str]:
        if prefix is None:
            return list(names)
        if prefix not in out:
            if notebooks is None or prefix in notebooks:
                raise ParameterError(f"{option}: notebook {prefix!r} is not among the notebooks run "
                                     f"({', '.join(names)})")
            raise ParameterError(f"{option}: {prefix!r} names no notebook (notebooks: {', '.join(notebooks)})")
        return [prefix]

    for item in data_dirs or []:
        prefix, eq, rest = item.partition("=")
        named = bool(eq) and re.fullmatch(r"[\w.-]+", prefix) is not None and prefix not in (".", "..")
        nb, path = (prefix, rest) if named else (None, item)
        if not path:
            raise ParameterError(f"--data-dir {item!r}: give a folder, e.g. --data-dir /data/cifar or "
                                 "--data-dir cbp=/data/imagenet")
        hint = f" (a folder whose name holds '=' is written with a '/', e.g. ./{item})" if named else ""
        for n in targets(nb, f"--data-dir {item!r}{hint}"):
            out[n]["data_dir"] = path
    for item in settings or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ParameterError(f"--set {item!r}: write NAME=VALUE or NOTEBOOK:NAME=VALUE, e.g. --set seeds=[0,1]")
        nb, _, name = key.rpartition(":")
        if name in RESERVED:
            raise ParameterError(f"--set {item!r}: {name} is reserved: reproduce sets it to each run's folder")
        try:
            value: object = json.loads(raw)
        except ValueError:
            value = raw
        for n in targets(nb or None, f"--set {item!r}"):
            out[n][name] = value
    return out


def _reproduce(args: argparse.Namespace) -> int:
    from .atomic import WriteError
    from .reproduce import ParameterError, RunInterrupted, list_notebooks, reproduce, summary_frame

    only = [n for part in (args.only or []) for n in part.split(",") if n.strip()]
    try:
        if args.only is not None and not only:
            raise ParameterError(f"--only {' '.join(repr(o) for o in args.only)} names no notebook; leave it out "
                                 f"to run all of them ({', '.join(list_notebooks())})")
        if args.timeout is not None and args.timeout <= 0:
            raise ParameterError(f"--timeout {args.timeout}: give a per-cell limit in seconds >= 1, or leave it out "
                                 "(no limit)")
        if args.jobs < 1:
            raise ParameterError(f"--jobs {args.jobs}: how many notebooks run at once, >= 1")
        notebooks = list(list_notebooks())
        extra = cli_parameters(only or notebooks, args.data_dir, args.set, notebooks)
        results = reproduce(args.preset, only=only or None, device=args.device,
                            execution_timeout=args.timeout, extra_parameters=extra, jobs=args.jobs)
    except (ParameterError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        stopped = [r for r in e.results if r.status == "interrupted"]
        if stopped:
            where = "; ".join(f"{r.notebook} recorded as {r.run_dir or f'nothing ({r.error})'}" for r in stopped)
            print(f"interrupted: {where}; {len(e.results) - len(stopped)} earlier notebook(s) recorded",
                  file=sys.stderr)
        else:
            r = e.results[-1]
            print(f"interrupted after {r.notebook} was recorded ({r.status}: {r.run_dir}); the remaining notebooks "
                  "did not run", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before any notebook was running; nothing recorded", file=sys.stderr)
        return 130
    print("\nSummary")
    print(summary_frame(results).to_string(index=False))
    return 0 if all(r.status == "ok" for r in results) else 1


def _figures(args: argparse.Namespace) -> int:
    from . import paths
    from .atomic import WriteError, check_writable
    from .figures import regenerate
    from .runs import sweep_stale_runs

    try:
        check_writable(paths.figures_dir(), "figures folder")
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in sweep_stale_runs(paths.runs_dir(), paths.figures_dir()):
        print(line)
    skipped: list[str] = []
    done = regenerate(skipped=skipped)
    for line in skipped:
        print(line, file=sys.stderr)
    if not done and not skipped:
        print("no completed runs in runs/: run `python -m paperlib reproduce` first", file=sys.stderr)
        return 1
    for nb, names in done.items():
        print(f"{nb}: {', '.join(names)}")
    return 1 if skipped else 0


def _levene(args: argparse.Namespace) -> int:
    """``levene FILE``: every bad input (file, values, --out) ends in one ``error:`` line and exit code 2."""
    import math
    from pathlib import Path

    from .atomic import WriteError, atomic_write_text, check_writable
    from .levene import levene_features
    from .levene_io import FeatureFileError, check_levene_defined, read_feature_file

    def fail(message: object) -> int:
        print("error: " + " ".join(str(message).split()), file=sys.stderr)  # one line, whatever the cause says
        return 2

    if not (isinstance(args.alpha, float) and math.isfinite(args.alpha) and 0 < args.alpha < 1):
        return fail(f"--alpha {args.alpha}: must be a number in (0, 1), e.g. --alpha 0.05")
    out = Path(args.out).expanduser() if args.out else None
    try:
        if out is not None:  # before the work: a folder or an unwritable place is refused at once
            if out.is_dir():
                raise WriteError(f"--out {out} is a folder; give a file path, e.g. --out {out / 'levene.csv'}")
            check_writable(out.parent, "folder of --out")
        features, labels = read_feature_file(args.file, args.label_column)
    except (FeatureFileError, WriteError) as e:
        return fail(e)
    try:
        res = levene_features(features, labels, alpha=args.alpha, center=args.center, mask_zeros=not args.keep_zeros)
        check_levene_defined(res, args.file, mask_zeros=not args.keep_zeros)
    except FeatureFileError as e:
        return fail(e)
    except (ValueError, TypeError) as e:
        return fail(f"{args.file}: {e}")
    verdict = "homogeneous" if res.homogeneous else "NOT homogeneous"
    print(f"Levene's test (center={res.center}) over {res.num_classes} classes, {res.num_samples} samples, "
          f"{features.shape[1]} feature dim(s)")
    print(f"W = {res.W:.6g}, p = {res.p:.4g}, F* = {res.F_star:.6g} at alpha = {res.alpha}: variances are {verdict}")
    print(res.frame.to_string(index=False))
    if out is not None:
        table = res.frame.assign(W=res.W, p=res.p, F_star=res.F_star, homogeneous=res.homogeneous)
        try:
            atomic_write_text(out, table.to_csv(index=False))
        except WriteError as e:
            return fail(e)
        print(f"wrote {out}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    import os

    from . import paths
    from .reproduce import _kernel_env

    _kernel_env()
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={paths.notebooks_dir()}",
           "--ip=127.0.0.1", "--no-browser", *(["--allow-root"] if os.geteuid() == 0 else []), *args.extra]
    os.execv(sys.executable, cmd)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train_cli import main as train_main

    return train_main(args=args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paperlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reproduce", help="run the notebooks headless with papermill and record the runs")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
    p.add_argument("--only", action="append", help="notebook names (comma-separated or repeated)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--timeout", type=int, default=None, help="per-cell execution timeout in seconds")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run at once, one thread each (default 1; "
                   "`make reproduce` uses 2 on a CPU)")
    p.add_argument("--data-dir", action="append", metavar="[NOTEBOOK=]DIR",
                   help="the notebooks' data_dir (the paper presets' datasets); repeat with NOTEBOOK= per notebook")
    p.add_argument("--set", action="append", metavar="[NOTEBOOK:]NAME=VALUE",
                   help="any other notebook parameter, VALUE as JSON when it parses (e.g. --set seeds=[0,1])")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("figures", help="redraw every figure in figures/ from runs/ without training")
    p.set_defaults(func=_figures)
    p = sub.add_parser("levene", help="Levene's variance-homogeneity test of class-wise features in a file")
    p.add_argument("file", help="CSV with a label column and feature columns, or .npz with features and labels")
    p.add_argument("--label-column", default="label")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--center", default="mean", choices=["mean", "median", "trimmed"])
    p.add_argument("--keep-zeros", action="store_true", help="count exactly-zero feature entries (ClimbQ skips them)")
    p.add_argument("--out", help="write the per-class table (with W, p, F*) as CSV")
    p.set_defaults(func=_levene)
    p = sub.add_parser("lab", help="start JupyterLab on localhost with the project's kernel")
    p.add_argument("extra", nargs="*")
    p.set_defaults(func=_lab)
    from .train_cli import build_parser

    p = sub.add_parser("train", help="train one method (torchrun --nproc_per_node=N -m paperlib train ... for DDP)")
    build_parser(p)
    p.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
