"""``python -m pipeline``: parse arguments, load config, open the run directory, call the runner."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

from core import config as config_mod
from core.errors import ConfigError, UserError
from core.training import resolve_device
from pipeline import predict, runner
from pipeline.rundir import CONFIG, RunDir

log = logging.getLogger("pipeline")

EPILOG = (
    "stages, in order:\n"
    + "\n".join(f"  {n:<9} {d}" for n, d in runner.DESCRIPTIONS.items())
    + (
        "\n\nconfig sections and keys (set with KEY=VALUE, e.g. cnn.fit.epochs=3 dp.enabled=true):\n"
        + config_mod.section_help()
        + "\n\nother commands:\n  python -m pipeline config [--config F] [KEY=VALUE ...]   print the resolved config as TOML"
        "\n  python -m pipeline verify RUN_DIR                       re-hash every artifact of a run"
        "\n  python -m pipeline predict RUN_DIR --input FILE         apply a trained model to new data (see predict -h)"
    )
)


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Train, explain, distil and report on a tabular regressor and a CNN, centrally or federated, optionally with DP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. dp.enabled=true")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config (see `python -m pipeline config`)")
    p.add_argument("--out", default="runs", metavar="DIR", help="parent folder of new run directories (default: runs)")
    p.add_argument("--run-dir", metavar="RUN_DIR", help="an existing run directory to resume or re-run a slice of")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and every later one")
    p.add_argument("--stages", metavar="A,B", help="run exactly these stages (earlier outputs are read from --run-dir)")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only; no progress bars")
    return p


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline config", description="Print the fully resolved config as TOML."
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", metavar="FILE.toml")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline verify",
        description="Re-hash every artifact a run recorded; non-zero exit on any difference.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    return p


def cmd_config(argv: list[str]) -> int:
    args = _config_parser().parse_args(argv)
    sys.stdout.write(config_mod.to_toml(config_mod.load_config(args.config, args.overrides)))
    return 0


def cmd_verify(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    run = RunDir.open(args.run_dir)
    problems = run.verify()
    if problems:
        for line in problems:
            print(line)
        print(f"FAILED: {len(problems)} problem(s) in {args.run_dir}", file=sys.stderr)
        return 1
    print(f"OK: {len(run.manifest['artifacts']) + 1} artifacts match the manifest of {args.run_dir}")
    return 0


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.start and args.stages:
        raise ConfigError("give either --from or --stages, not both")
    if args.run_dir:
        run = RunDir.open(args.run_dir)
        if args.config or overrides:
            raise ConfigError(
                "a run directory keeps the config it started with; drop --config/overrides, or start a new run"
            )
        cfg = config_mod.load_config(run.path / CONFIG)
    else:
        if args.start:
            raise ConfigError("--from re-runs part of an existing run: add --run-dir runs/<run>")
        cfg = config_mod.load_config(args.config, overrides)
    names = runner.select_stages(stages=args.stages.split(",") if args.stages else None, start=args.start)
    if args.run_dir and not (args.start or args.stages):
        # Resume: skip stages already complete.
        names = [n for n in names if run.stage_status(n) != "complete"] or names[-1:]
    device = resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
    if not args.run_dir:
        run = RunDir.create(
            args.out,
            config_toml=config_mod.to_toml(cfg),
            command=[sys.executable, "-m", "pipeline", *argv],
            device=str(device),
        )
    log.info("run directory: %s", run.path)
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    runner.run_stages(cfg, run, names, progress=progress)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.manifest.setdefault("invocations", []).append(
        {"stages": names, "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_mb, 1), "device": str(device)}
        | ({"peak_tree_rss_mb": round(tree_mb, 1)} if (tree_mb := _peak_tree_rss_mb()) else {})
    )
    run.save_manifest()
    report = run.path / "report.html"
    print(f"run directory: {run.path}" + (f"\nreport: {report}" if report.exists() else ""))
    log.info("stages %s done in %.1f s, peak memory %.0f MB", ",".join(names), wall, peak_mb)
    return 0


COMMANDS = {"config": cmd_config, "verify": cmd_verify, "predict": predict.cmd_predict}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = "--quiet" in argv
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # library warnings (Opacus, shap) go through logging, not lost
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else cmd_run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps every completed stage; resume with --run-dir", file=sys.stderr)
        return 130


def _peak_tree_rss_mb() -> float:
    """Peak summed RSS of this process and its children (Flower, Ray) during a federated run; 0 if none ran."""
    launcher = sys.modules.get("federated.launcher")  # loaded only if a federated run happened
    return launcher.peak_tree_rss_mb() if launcher is not None else 0.0


if __name__ == "__main__":
    sys.exit(main())
