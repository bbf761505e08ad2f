"""The ``saefast`` subcommands: each ``run_<command>(args)`` does one job and returns the exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from .runs import RUN_FILE, RUN_FORMAT, RUN_VERSION, CLIError, read_run, stderr_line

KINDS = ("single", "bagging", "boosting")
DTYPES = ("bfloat16", "float16", "float32")


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def run_harvest(args: argparse.Namespace) -> int:
    """``saefast harvest`` (re-running it on the same --out resumes; a SIGINT/SIGTERM stops after the batch under
    way, keeping the shards written). Under ``torchrun`` the ranks share out the shards (gloo on the CPU, NCCL on
    CUDA, each rank on its ``LOCAL_RANK`` GPU) and write the store one process would; only rank 0 reports."""
    from ..data.harvest import harvest
    from ..data.hf import load_model
    from ..data.hooks import layer_hook, resolve_hooks
    from ..data.text import text_source
    from ..devices import check_device
    from ..distributed import DistributedError, is_main, local_device, torchrun_group

    if args.tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {args.tokens}")
    if args.layer is not None and args.hook:
        raise CLIError("give either --layer or --hook, not both")
    check_device(args.device)
    texts = text_source(args.text)  # fails fast on a missing file, before the model loads
    with torchrun_group(args.device) as distributed:
        main = is_main()
        try:
            model, tokenizer = load_model(args.model, device=local_device(args.device),
                                          progress=not args.no_progress and main)
            if args.hook:
                hooks = resolve_hooks(model, args.hook)
            else:
                layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
                hooks = [layer_hook(model, layer)]
            store = harvest(model, args.out, hooks, args.tokens, tokenizer=tokenizer, texts=texts,
                            context=args.context, batch_size=args.batch_size, dtype=_dtype(args.dtype),
                            shard_tokens=args.shard_tokens, exclude_special=not args.keep_special,
                            progress=not args.no_progress, metadata={"model": args.model, "text": args.text},
                            log=stderr_line, distributed=distributed)
        except DistributedError as err:  # some ranks failed: one line naming them, like any bad input
            raise CLIError(str(err)) from err
    if main:
        print(f"wrote {store.n_tokens:,} tokens × {len(hooks)} hook(s) ({', '.join(hooks)}; d={store.d}) to "
              f"{args.out}")
    return 0


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON or TOML file: top-level run options plus optional ``[sae]`` and ``[train]`` tables."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        if file.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise CLIError("TOML config files need Python 3.11+; use JSON") from None
            return tomllib.loads(file.read_text())
        return json.loads(file.read_text())
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, CLIError):
            raise
        raise CLIError(f"config file {path} is not valid {file.suffix.lstrip('.') or 'JSON'}: {err}") from None


TRAIN_DEFAULTS = {"kind": "single", "members": 4, "chains": 1, "bootstrap": False, "latents": None, "k": 32,
                  "activation": "topk", "steps": 1000, "lr": 1e-3, "batch_size": 1024, "seed": 0, "data_seed": 0,
                  "hook": None, "device": "cpu", "checkpoint_every": 0, "checkpoint_minutes": 5.0, "backend": "auto",
                  "parallel": None, "member_shards": None}

POSITIVE = ("members", "chains", "latents", "k", "steps", "batch_size")
"""Train options that count something and must be >= 1."""

DATA_FIELDS = ("data", "hook", "batch_size", "data_seed")
"""Run options outside the checkpoint that fix the batches a resumed run sees."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_train_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Merge defaults < config file < flags into (run options, SAEConfig extras, TrainConfig extras), and check
    every option before anything is read or computed: sizes >= 1, no option that the chosen kind ignores."""
    options = dict(TRAIN_DEFAULTS)
    sae_extra: dict[str, Any] = {}
    train_extra: dict[str, Any] = {}
    given: set[str] = set()  # set by the user (file or flag), not by a default
    if args.config:
        file = read_config_file(args.config)
        sae_extra = dict(file.pop("sae", {}))
        train_extra = dict(file.pop("train", {}))
        unknown = set(file) - set(options) - {"data", "out"}
        if unknown:
            raise CLIError(f"unknown key(s) in {args.config}: {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(options))}, data, out, [sae], [train])")
        options.update(file)
        given |= set(file)
    for key in options:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
            given.add(key)
    options["data"] = args.data or options.get("data")
    options["out"] = args.out or options.get("out")
    for key in ("data", "out"):
        if not options[key]:
            raise CLIError(f"{_flag(key)} is required (or set {key!r} in the config file)")
    if options["kind"] not in KINDS:
        raise CLIError(f"--kind must be one of {', '.join(KINDS)}, got {options['kind']!r}")
    for key in POSITIVE:
        value = options[key]
        if value is None and key == "latents":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CLIError(f"{_flag(key)} must be a whole number >= 1, got {value!r}")
    if options["parallel"] is not None and options["parallel"] not in ("members", "data", "members,data"):
        raise CLIError(f"--parallel must be members, data or members,data, got {options['parallel']!r}")
    if options["member_shards"] is not None:
        if options["parallel"] != "members,data":
            raise CLIError("--member-shards applies to --parallel members,data (a members × data mesh)")
        if isinstance(options["member_shards"], bool) or not isinstance(options["member_shards"], int) \
                or options["member_shards"] < 1:
            raise CLIError(f"--member-shards must be a whole number >= 1, got {options['member_shards']!r}")
    for key in ("seed", "data_seed", "checkpoint_every"):
        if isinstance(options[key], bool) or not isinstance(options[key], int) or options[key] < 0:
            raise CLIError(f"{_flag(key)} must be a whole number >= 0, got {options[key]!r}")
    if not isinstance(options["lr"], (int, float)) or not options["lr"] > 0:
        raise CLIError(f"--lr must be > 0, got {options['lr']!r}")
    if not isinstance(options["checkpoint_minutes"], (int, float)) or not options["checkpoint_minutes"] >= 0:
        raise CLIError(f"--checkpoint-minutes must be >= 0 (0: no checkpoints in time), got "
                       f"{options['checkpoint_minutes']!r}")
    kind = options["kind"]
    if "members" in given and kind == "single":
        raise CLIError("--members applies to --kind bagging or boosting (an ensemble of J SAEs), not single; "
                       "for one bigger SAE, raise --latents")
    if int(options["chains"]) > 1 and kind != "boosting":
        raise CLIError(f"--chains applies to --kind boosting (independent boosting chains), not {kind}")
    if options["bootstrap"] and kind == "boosting":
        raise CLIError("--bootstrap applies to --kind single or bagging (a boosting stage reads the residual)")
    if "k" in given and options["activation"] in ("relu", "jumprelu"):
        raise CLIError(f"--k applies to --activation topk or batchtopk; {options['activation']} sets its sparsity "
                       f"with a penalty ([sae] {'l1_coef' if options['activation'] == 'relu' else 'l0_coef'})")
    return options, sae_extra, train_extra


def check_run_dir(out: Path, data: Path, resume: bool, writer: bool = True) -> dict[str, Any] | None:
    """Check ``--out`` before training: it must be new, empty or a run of ours; ``--resume`` needs its checkpoint,
    and without ``--resume`` a checkpoint there is kept, not overwritten. Returns the checkpoint's train state
    (``--resume``) or None.

    ``writer=False`` (the other ranks of a distributed run) skips the "new, empty or ours" check: the writing rank
    makes that check, and then writes ``run.json``, possibly while another rank is still looking (it would see the
    half-written file, not yet a run of ours)."""
    from ..models import sharded
    from ..models.checkpoint import CONFIG_FILE

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory for the run")
    if out.resolve() == data.resolve():
        raise CLIError(f"--out {out} is the activation store itself; give the run its own directory")
    has_checkpoint = out.is_dir() and sharded.newest(out) is not None  # a plain one, or a distributed run's shards
    ours = read_run(out) is not None or has_checkpoint
    if writer and out.is_dir() and any(out.iterdir()) and not ours:
        raise CLIError(f"--out {out} is not empty and holds no saefast run (no {RUN_FILE} or {CONFIG_FILE}); "
                       f"choose a new or empty directory")
    if not resume:
        if has_checkpoint:
            raise CLIError(f"{out} already holds a trained model; pass --resume to continue it or choose another "
                           f"--out")
        return None
    if not has_checkpoint:
        why = (" (the run there stopped before its first checkpoint: run again without --resume)" if ours
               else "; check --out, or drop --resume to start a new run")
        raise CLIError(f"--resume: there is no checkpoint to resume in {out}{why}")
    return sharded.describe(out).get("train_state") or {}


def _write_run(out: Path, run: dict[str, Any]) -> None:
    atomic_write_bytes(out / RUN_FILE, json.dumps({"format": RUN_FORMAT, "version": RUN_VERSION, **run},
                                                  indent=2).encode())


def run_train(args: argparse.Namespace) -> int:
    """``saefast train``. With ``--parallel`` under torchrun (or ``--nproc P``, which starts torchrun), every rank
    runs this; setup errors on any rank are reported once, by rank 0, with the failing rank's message."""
    from .. import distributed
    from ..interrupts import Interrupted
    from ..training import train

    if args.nproc is not None:
        return _launch_torchrun(args)
    error: BaseException | None = None
    options: dict[str, Any] = {}
    try:
        options, sae_extra, train_extra = parse_train_options(args)
    except CLIError as err:
        error = err
    parallel = options.get("parallel") or args.parallel
    if parallel and not distributed.launched_by_torchrun():
        raise CLIError(f"--parallel {parallel} splits the run over several processes: start it with torchrun "
                       f"(torchrun --nproc_per_node=P -m saefast train ...) or add --nproc P")
    if not parallel and distributed.launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("under torchrun every process would train the whole run into the same --out: say how they "
                       "split it with --parallel members, data or members,data")
    with distributed.torchrun_group(options.get("device") or "cpu"):
        setup = None
        if error is None:
            try:
                setup = _prepare_train(args, options, sae_extra, train_extra, parallel)
            except (ValueError, TypeError, FileNotFoundError, KeyError, OSError, ImportError) as err:
                error = err
        if parallel:
            distributed.agree_on_errors(error)
        elif error is not None:
            raise error
        model, config, store, run, batches, done_before = setup
        out, main = Path(options["out"]), distributed.is_main()
        start = time.perf_counter()
        try:
            history = train(model, batches, config=config, parallel=parallel,
                            member_shards=options["member_shards"])
        except Interrupted as stop:
            if main:
                _write_run(out, {**run, "status": "interrupted", "stopped_by": stop.signum})
            raise
    seconds = time.perf_counter() - start
    stages = len(model.stages())
    trained = config.steps * stages - done_before  # steps taken in this process
    if not main:
        return 0
    if trained == 0:  # a finished run resumed with its own settings (train() checked them)
        print(f"{out} already finished its {config.steps} steps" + (" per stage" if stages > 1 else "")
              + f": nothing to train (saefast eval --model {out} --data … measures it)")
        return 0
    tokens_per_s = trained * int(options["batch_size"]) / seconds if seconds > 0 else None
    final = history[-1] if history else {}
    run.update(status="finished", seconds=seconds, steps_this_session=trained, tokens_per_s=tokens_per_s,
               final=final or None)
    _write_run(out, run)
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=2).encode())
    cfg = model.cfg
    members = run["members"] * run["chains"]
    what = "members' mean " if members > 1 else ""
    ranks = run["parallel"]["ranks"] if parallel else 1
    where = f" on {ranks} rank{'s' * (ranks != 1)} ({run['parallel']['layout']})" if parallel else ""
    print(f"trained {options['kind']} ({members} × {cfg.n_latents} latents" + (f", k={cfg.k}" if cfg.activation in
          ("topk", "batchtopk") else "") + f") on {store.hook}{where}: {what}fvu {final.get('fvu', float('nan')):.4f}"
          f", {what}l0 {final.get('l0', float('nan')):.1f}, {tokens_per_s or 0:,.0f} tokens/s"
          + (" (resumed)" if args.resume else "") + f" → {out}")
    if members > 1:
        print("  (each member on its own input, a boosting stage on its residual; `saefast eval` measures the "
              "ensemble's reconstruction)")
    return 0


def _prepare_train(args: argparse.Namespace, options: dict[str, Any], sae_extra: dict[str, Any],
                   train_extra: dict[str, Any], parallel: str | None) -> tuple:
    """Everything ``saefast train`` checks and builds before training: the run directory, the store, the model,
    the train config, ``run.json`` (rank 0) and the batches (each rank's share of every batch with
    ``--parallel data``). Returns ``(model, config, store, run, batches, steps done before)``."""
    from .. import distributed
    from ..config import SAEConfig, TrainConfig
    from ..data.store import ActivationStore
    from ..devices import check_device
    from ..models import SAE, Ensemble
    from ..ops import resolve_backend
    from ..training import differences

    device = distributed.local_device(check_device(options["device"]))
    out, data = Path(options["out"]), Path(options["data"])
    state = check_run_dir(out, data, args.resume, writer=distributed.is_main())
    store = ActivationStore(data, hook=options["hook"])
    previous = read_run(out) if args.resume else None
    if previous:  # the batches depend on these too, and the checkpoint does not record them
        now = {"data": str(data), "hook": store.hook, "batch_size": options["batch_size"],
               "data_seed": options["data_seed"]}
        changed = differences({key: previous[key] for key in DATA_FIELDS if key in previous},
                              {key: now[key] for key in DATA_FIELDS if key in previous}, where="the run")
        if changed:
            raise CLIError(f"--resume: {out} was trained with other data settings: {'; '.join(changed)}")
    latents = options["latents"] or 4 * store.d
    cfg = SAEConfig(d_in=store.d, n_latents=int(latents), k=int(options["k"]), activation=options["activation"],
                    **sae_extra)
    resolve_backend(options["backend"], device, cfg.activation)  # an unusable backend fails before training starts
    if options["kind"] == "single":
        model = SAE(cfg, seed=int(options["seed"]))
    else:
        model = Ensemble(cfg, int(options["members"]), options["kind"], seed=int(options["seed"]),
                         chains=int(options["chains"]))
    model.to(device)
    train_options = {"steps": int(options["steps"]), "lr": float(options["lr"]), "seed": int(options["seed"]),
                     "progress": not args.no_progress, "checkpoint_dir": str(out),
                     "checkpoint_every": int(options["checkpoint_every"]),
                     "checkpoint_minutes": float(options["checkpoint_minutes"]), "resume": args.resume,
                     "backend": options["backend"], **train_extra}
    if options["bootstrap"]:  # the flag or the file's top level; a [train] table may also set it
        train_options["bootstrap"] = True
    config = TrainConfig(**train_options)
    done_before = int(state.get("stage", 0)) * config.steps + int(state.get("step", 0)) if state else 0
    run = {"kind": options["kind"], "members": getattr(model, "members", 1), "chains": getattr(model, "chains", 1),
           "bootstrap": config.bootstrap, "data": str(data), "hook": store.hook, "sae": cfg.to_dict(),
           "train": dict(train_options), "batch_size": int(options["batch_size"]),
           "data_seed": int(options["data_seed"]), "device": str(device), "status": "running",
           "resumed": bool(args.resume)}
    shard = None
    if parallel:
        ranks = distributed.world_size()
        member_shards, data_shards = distributed.mesh_shape(parallel, ranks, options["member_shards"])
        run["parallel"] = {"mode": parallel, "ranks": ranks, "member_shards": member_shards,
                           "data_shards": data_shards, "layout": f"{member_shards} member × {data_shards} data"}
        if data_shards > 1:  # row-major mesh: the data rank is the rank's place in its group of P_d
            shard = (distributed.rank() % data_shards, data_shards)
    if not args.resume and distributed.is_main():  # from here on --out is recognisably a run of ours
        _write_run(out, run)
    batches = store.batches(int(options["batch_size"]), seed=int(options["data_seed"]), epochs=None,
                            drop_last=store.n_tokens >= int(options["batch_size"]), device=device, shard=shard)
    return model, config, store, run, batches, done_before


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``saefast train --nproc P ...``: run the same command under ``torchrun --standalone --nproc_per_node=P`` on
    this machine and return its exit status."""
    import subprocess

    if args.nproc < 1:
        raise CLIError(f"--nproc must be a whole number >= 1, got {args.nproc}")
    if not args.parallel:
        raise CLIError("--nproc starts several processes; say how they split the run with --parallel members, data "
                       "or members,data")
    argv = list(args.argv)
    for i, arg in enumerate(argv):  # drop --nproc P / --nproc=P
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "saefast", *argv]
    return subprocess.call(command)


def run_demo(args: argparse.Namespace) -> int:
    """``saefast demo``."""
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig.large() if args.large else DemoConfig()
    for key in ("model", "layer", "text", "steps", "members", "k", "seed"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    if args.latents is not None:
        config.n_latents = args.latents
    if args.tokens is not None:
        config.train_tokens = args.tokens
    if args.no_stability:
        config.stability = False
    if args.spliced_tokens is not None:
        config.spliced_tokens = args.spliced_tokens
    config.validate()
    print(f"saefast demo — real activations: {config.model}, layer {config.layer}, text {config.text!r}; "
          f"{config.train_tokens:,} training + {config.eval_tokens:,} held-out tokens", flush=True)
    report = run_demo(config, args.out, cache_dir=args.cache, progress=not args.no_progress)
    data = report["data"]
    print(("reused cached activations from " if data["reused_cached_activations"] else "harvested activations to ")
          + data["store"])
    print(format_table(report["rows"]))
    print(f"wrote {args.out}/results.json and {args.out}/members.png")
    print(f"feature browser of the bagging ensemble: open {report['browser']['index']} in a browser "
          f"({report['browser']['latents']:,} latents, {report['browser']['seconds']:.0f} s)")
    return 0


def run_sharpen(args: argparse.Namespace) -> int:
    """``saefast sharpen`` (``--resume`` continues an interrupted run after its last complete cycle)."""
    from ..sharpen.runner import HISTORY_FILE
    from ..sharpen.tasks import format_history, run_task

    saved = Path(args.out) / HISTORY_FILE  # checked here too, before a task's model loads
    if saved.is_file() and not args.resume:
        raise CLIError(f"{args.out} already holds a sharpen run; pass --resume to continue it or choose another --out")
    if args.resume and not saved.is_file():
        raise CLIError(f"--resume: {args.out} holds no completed sharpen cycle to continue (no {HISTORY_FILE}); "
                       f"run without --resume")

    overrides = {key: getattr(args, key) for key in ("cycles", "top_n", "top_percent", "aux_coef", "target", "members",
                                                    "combine", "epochs", "finetune_epochs", "sae_steps", "backend")
                 if getattr(args, key) is not None}
    if args.top_percent is not None:
        overrides["top_n"] = None
    overrides["progress"] = not args.no_progress
    print(f"saefast sharpen — task {args.task}, {overrides.get('cycles', 2)} cycle(s) after the baseline", flush=True)

    def log(row: dict[str, Any]) -> None:
        print(f"cycle {row['cycle']}: test accuracy {row['test_accuracy']:.4f}, ARI {row['ari']:.3f}, "
              f"U {row['uncertainty']:.3f} bits, silhouette {row['silhouette_labels']:.3f}", flush=True)

    if args.resume:
        print(f"resuming the sharpen run in {args.out}", flush=True)
    report = run_task(args.task, out=args.out, seed=args.seed, log=log, resume=args.resume, **overrides)
    print(format_history(report["history"]))
    print(f"wrote {args.out}/results.json, {args.out}/history.png and each cycle's SAE and masks")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """``saefast bench``."""
    from ..bench import (
        CASES,
        IMPLEMENTATIONS,
        format_data_markdown,
        format_markdown,
        plot_report,
        run_benchmarks,
        run_data_benchmark,
    )
    from ..devices import check_device

    if args.device is not None:
        check_device(args.device)

    def progress(what: str) -> None:
        if not args.no_progress:
            print(f"  {what}", file=sys.stderr, flush=True)

    cases = [case for case in (args.cases or CASES) if case != "data"]
    report: dict = {}
    tables = []
    if cases:
        report = run_benchmarks(args.preset, cases=cases, backends=args.backends or IMPLEMENTATIONS,
                                warmup=args.warmup, repeats=args.repeats, device=args.device, progress=progress,
                                verbose=args.verbose)
        tables.append(format_markdown(report))
    if args.cases and "data" in args.cases:
        report["data"] = run_data_benchmark(mib=args.data_mib, directory=args.data_dir, progress=progress)
        tables.append(format_data_markdown(report["data"]))
    table = "\n\n".join(tables)
    print(table)
    for path, data in ((args.json, json.dumps(report, indent=2).encode()), (args.markdown, (table + "\n").encode())):
        if path:
            atomic_write_bytes(path, data)
            print(f"wrote {path}")
    if args.png and cases:
        plot_report(report, args.png)
        print(f"wrote {args.png}")
    return 0
