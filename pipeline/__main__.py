"""``python -m pipeline``: parse arguments, load config, open the run directory, call the runner."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from auditml_core import config as config_mod
from auditml_core import config_effect
from auditml_core.artifacts import disk_full
from auditml_core.distributed import die_with_parent, join, launched
from auditml_core.errors import ConfigError, DiskFullError, UserError
from auditml_core.training import resolve_device
from pipeline import console, evidence, ranks, runner
from pipeline.rundir import RunDir

log = logging.getLogger("pipeline")

EPILOG = (
    "stages, in order:\n"
    + "\n".join(f"  {n:<9} {d}" for n, d in runner.DESCRIPTIONS.items())
    + (
        "\n\nconfig sections and keys (set with KEY=VALUE, e.g. cnn.fit.epochs=3 dp.enabled=true):\n"
        + config_mod.section_help()
        + "\n\nother commands:\n  python -m pipeline config [--config F] [KEY=VALUE ...]   print the resolved config as TOML"
        "\n  python -m pipeline verify RUN_DIR [--key PUB.pem]       re-hash every artifact, check completeness"
        "\n  python -m pipeline sign RUN_DIR --key KEY.pem           sign the run's manifest (Ed25519)"
        "\n  python -m pipeline keygen KEY.pem                       make an Ed25519 key pair for sign/verify"
        "\n  python -m pipeline predict RUN_DIR --input FILE         apply a trained model to new data (see predict -h)"
        "\n  python -m pipeline serve RUN_DIR                        serve the models over HTTP (see serve -h)"
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
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show the libraries' INFO logs (shap, matplotlib, ...)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse settings that change nothing under the current switches (default: warn once per key)",
    )
    return p


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline config", description="Print the fully resolved config as TOML."
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", metavar="FILE.toml")
    return p


# Exit codes of `verify`: integrity and completeness are separate questions with separate answers.
VERIFY_OK = 0  # every artifact matches the manifest (and the signature, with --key) and every stage is complete
VERIFY_MISMATCH = 1  # an artifact is edited, missing, extra or outside the run, or the signature fails
VERIFY_INCOMPLETE = 3  # every recorded artifact matches, but some stage is not complete (killed, failed, stale)
# 2: the run directory cannot be read at all (damaged manifest) or a usage error, as for every command


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline verify",
        description="Re-hash every artifact a run recorded and check that every stage completed.",
        epilog=(
            f"exit codes: {VERIFY_OK} = artifacts match and the run is complete; {VERIFY_MISMATCH} = an artifact "
            f"(or the signature) does not match; {VERIFY_INCOMPLETE} = artifacts match but a stage is not complete; "
            "2 = the run directory is damaged or the arguments are wrong"
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--key", metavar="PUBLIC.pem", help="also check manifest.sig against this Ed25519 public key")
    p.add_argument(
        "--rerender",
        action="store_true",
        help="also re-render the report from the recorded artifacts and compare it byte for byte",
    )
    return p


def _sign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline sign", description="Sign a run's manifest.json with an Ed25519 key (manifest.sig)."
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--key", required=True, metavar="PRIVATE.pem", help="Ed25519 private key (python -m pipeline keygen)"
    )
    return p


def cmd_config(argv: list[str]) -> int:
    args = _config_parser().parse_intermixed_args(argv)
    sys.stdout.write(config_mod.to_toml(config_mod.load_config(args.config, args.overrides)))
    return 0


def cmd_verify(argv: list[str]) -> int:
    args = _verify_parser().parse_args(argv)
    run = RunDir.open(args.run_dir)
    problems = run.verify()
    if args.key:
        bad_signature = evidence.check_signature(run, args.key)
        problems += [bad_signature] if bad_signature else []
    if args.rerender and not problems:
        problems += evidence.rerender(run)
    stages = run.incomplete(list(runner.STAGES))
    ledgers = [
        f"unnoted ledger: {rel} (a federated client's privacy ledger, written before it trained; the run stopped "
        "before the manifest noted it: resume with --run-dir to record it)"
        for rel in run.unnoted_ledgers()
    ]
    leftovers = [
        f"leftover: {tmp.relative_to(run.path).as_posix()} (the temporary file of an interrupted or in-progress "
        "write; no artifact refers to it; a resume with --run-dir removes it)"
        for tmp in run.interrupted_writes()
    ]
    incomplete = stages + ledgers + leftovers
    for line in problems + incomplete:
        print(line)
    print(f"manifest sha256: {run.manifest_sha256()}")
    if problems:
        print(f"FAILED: {len(problems)} integrity problem(s) in {args.run_dir}", file=sys.stderr)
        return VERIFY_MISMATCH
    n = len(run.manifest["artifacts"]) + 1
    signed = ", signature valid" if args.key else ""
    if incomplete:
        counts = [(len(stages), "stage(s) not complete"), (len(ledgers), "unnoted ledger(s)")]
        counts.append((len(leftovers), "leftover temporary file(s)"))
        what = ", ".join(f"{k} {label}" for k, label in counts if k)
        print(
            f"INCOMPLETE: {n} artifacts match the manifest{signed}, but {what} in {args.run_dir}; resume with --run-dir",
            file=sys.stderr,
        )
        return VERIFY_INCOMPLETE
    print(f"OK: {n} artifacts match the manifest{signed}; every stage is complete in {args.run_dir}")
    return VERIFY_OK


def cmd_sign(argv: list[str]) -> int:
    args = _sign_parser().parse_args(argv)
    run = RunDir.open(args.run_dir)
    digest = evidence.sign(run, args.key)
    print(f"signed {run.path / 'manifest.json'} (sha256 {digest}) -> {run.path / 'manifest.sig'}")
    return 0


def cmd_keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline keygen", description="Make an Ed25519 key pair.")
    p.add_argument(
        "private_key", metavar="KEY.pem", help="where to write the private key (the public key goes next to it)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing key pair at that path")
    args = p.parse_args(argv)
    pub = evidence.keygen(args.private_key, force=args.force)
    print(f"private key: {args.private_key} (keep it secret)\npublic key: {pub} (give it to the auditor)")
    return 0


def cmd_run(argv: list[str]) -> int:
    if launched():  # a rank of a torchrun job: train.processes > 1 on this host, or torchrun on several hosts
        return _as_rank(argv)
    return _run(argv, followers=None)


def _as_rank(argv: list[str]) -> int:
    """Join the job's process group; rank 0 runs the pipeline, every other rank follows it (pipeline.ranks)."""
    die_with_parent()
    world = join()
    if not world.leader:
        return ranks.follow(world)
    followers = ranks.Followers(world)
    try:
        return _run(argv, followers=followers)
    finally:
        followers.release(ok=False)  # nothing when the train stage released them already


def _run(argv: list[str], *, followers: ranks.Followers | None) -> int:
    args = _run_parser().parse_intermixed_args(argv)  # KEY=VALUE before, between or after options
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.start and args.stages:
        raise ConfigError("give either --from or --stages, not both")
    names = runner.select_stages(stages=args.stages.split(",") if args.stages else None, start=args.start)
    if args.run_dir:
        run = RunDir.open(args.run_dir)
        if args.config or overrides:
            raise ConfigError(
                "a run directory keeps the config it started with; drop --config/overrides, or start a new run"
            )
        run.remove_interrupted_writes()  # this command owns the run now: a kill's leftovers can go
        cfg = config_mod.load_config(run.read_config())
    else:
        if args.start:
            raise ConfigError("--from re-runs part of an existing run: add --run-dir runs/<run>")
        cfg = config_mod.load_config(args.config, overrides)
        config_mod.check_pipeline_mode(cfg)  # a privacy switch central training would ignore is refused
        if not (followers is not None and ranks.launched_here()):  # our launcher has warned (or refused) already
            _check_effect(cfg, args.config, overrides, strict=args.strict)
    # imported for runs only: tracking loads predict and distill (explain, ONNX Runtime, scikit-learn), ~2.3 s of
    # the start-up of every other command (config, verify, sign, keygen, a refused setting)
    from pipeline import tracking

    tracking.check(cfg)  # tracking on without mlflow installed is refused now, not after training
    if args.run_dir and not (args.start or args.stages):
        names = runner.resume_stages(run)  # resume: from the first stage not complete
    if followers is None and cfg.train.processes > 1:  # start the ranks: this process becomes their launcher
        return ranks.launch(argv, processes=cfg.train.processes, num_threads=cfg.train.num_threads)
    if followers is not None and cfg.train.mode != "central":
        raise ConfigError("a federated run is one process (its clients spread over Ray): start it without torchrun")
    device = resolve_device(cfg.train.device, num_threads=cfg.train.num_threads)
    if not args.run_dir:
        _check_out(args.out)
        run = RunDir.create(
            args.out,
            config_toml=config_mod.to_toml(cfg),
            command=[sys.executable, "-m", "pipeline", *argv],
            device=str(device),
        )
    log.info("run directory: %s", run.path)
    if followers is not None:
        ranks.note_run_dir(run.path)
        if "train" not in names:
            followers.release(ok=True)  # only training needs them
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    runner.run_stages(cfg, run, names, progress=progress, followers=followers)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.manifest.setdefault("invocations", []).append(
        {"stages": names, "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_mb, 1), "device": str(device)}
        | ({"peak_tree_rss_mb": round(tree_mb, 1)} if (tree_mb := _peak_tree_rss_mb()) else {})
        | ({"world_size": followers.world.size} if followers is not None else {})
    )
    run.save_manifest()
    tracking.record(cfg, run, verbose=args.verbose)  # MLflow, once, from rank 0 (never fails the run; recorded)
    report = run.path / "report.html"
    print(f"run directory: {run.path}" + (f"\nreport: {report}" if report.exists() else ""))
    print(f"manifest sha256: {run.manifest_sha256()} (record it out of band; verify checks the run against it)")
    log.info("stages %s done in %.1f s, peak memory %.0f MB", ",".join(names), wall, peak_mb)
    return 0


def _check_effect(cfg: config_mod.Config, path: str | None, overrides: list[str], *, strict: bool) -> None:
    """Warn once per given key that changes nothing under ``cfg``'s switches, naming the switch; refuse if strict."""
    inert = config_effect.inert_settings(cfg, config_effect.given_keys(path, overrides))
    if inert and strict:
        first, switch = next(iter(inert.items()))
        more = f" (and {len(inert) - 1} more: {', '.join(list(inert)[1:4])})" if len(inert) > 1 else ""
        raise ConfigError(
            f"setting {first} has no effect: it counts only with {switch}{more}; set the switch or drop the "
            "setting (--strict refuses settings with no effect)"
        )
    for key, switch in inert.items():
        log.warning("setting %s has no effect: it counts only with %s", key, switch)


def _check_out(out: str) -> None:
    """Refuse an --out that is a file, sits under a file, or cannot be written, before any work."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out!r} is not a directory; pass a folder for the run directories")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out!r} cannot be created ({exc.strerror or exc}); pass a writable folder") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r} is not writable; pass a folder you can write to")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every stage's cleanup (mark failed, keep completed) runs the same way."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _terminated(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, SIGTERM: library code can wrap it (a signal that lands inside a
    class body being created, e.g. while torch lazily imports ``torch._dynamo``, surfaces as a RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Terminated):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def cmd_serve(argv: list[str]) -> int:
    import pipeline.serve  # lazily: FastAPI, uvicorn and prometheus-client would add ~1 s to every other command

    return pipeline.serve.cmd_serve(argv)


def cmd_predict(argv: list[str]) -> int:
    import pipeline.predict  # lazily: explain, scipy.stats, ONNX Runtime: ~2.3 s of every other command's start-up

    return pipeline.predict.cmd_predict(argv)


COMMANDS = {
    "config": cmd_config,
    "verify": cmd_verify,
    "sign": cmd_sign,
    "keygen": cmd_keygen,
    "predict": cmd_predict,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console.configure_logging(quiet="--quiet" in argv, verbose=bool({"-v", "--verbose"} & set(argv)))
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        previous = None
    try:
        return command(argv[1:]) if command else cmd_run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if (full := disk_full(exc)) is None:
            raise
        print(
            f"error: {full}; nothing written was left half-done: free space and run the command again", file=sys.stderr
        )
        return DiskFullError.exit_code
    except Terminated:
        print("terminated (SIGTERM): the running stage is marked failed; resume with --run-dir", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:
        if not _terminated(exc):
            raise
        print("terminated (SIGTERM): the running stage is marked failed; resume with --run-dir", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps every completed stage; resume with --run-dir", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _peak_tree_rss_mb() -> float:
    """Peak summed RSS of this process and its children (Flower, Ray) during a federated run; 0 if none ran."""
    launcher = sys.modules.get("federated.launch.processes")  # loaded only if a federated run happened
    return launcher.peak_tree_rss_mb() if launcher is not None else 0.0


if __name__ == "__main__":
    code = main()
    # The interpreter's last collections walk every object the libraries loaded (torch, sklearn, WeasyPrint):
    # 1.7 s of a default run's exit, 0.4 s with them frozen (measured). Exit handlers run as usual.
    gc.freeze()
    sys.exit(code)
