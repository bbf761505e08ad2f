"""The ``saefast`` command line: ``harvest``, ``train``, ``eval``, ``demo``, ``sharpen``, ``bench``.

Every subcommand has ``--help`` and sensible defaults; bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, atomic_write_bytes

KINDS = ("single", "bagging", "boosting")
DTYPES = ("bfloat16", "float16", "float32")


class CLIError(ValueError):
    """Bad command-line input (reported as one line, exit status 2)."""


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# ------------------------------------------------------------------------------------------------------
# harvest
# ------------------------------------------------------------------------------------------------------


def _harvest(args: argparse.Namespace) -> int:
    from .harvest import harvest, layer_hook, resolve_hooks
    from .hf import load_model
    from .text import text_source

    if args.tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {args.tokens}")
    if args.layer is not None and args.hook:
        raise CLIError("give either --layer or --hook, not both")
    texts = text_source(args.text)  # fails fast on a missing file, before the model loads
    model, tokenizer = load_model(args.model, device=args.device, progress=not args.no_progress)
    if args.hook:
        hooks = resolve_hooks(model, args.hook)
    else:
        layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
        hooks = [layer_hook(model, layer)]
    store = harvest(model, args.out, hooks, args.tokens, tokenizer=tokenizer, texts=texts, context=args.context,
                    batch_size=args.batch_size, dtype=_dtype(args.dtype), shard_tokens=args.shard_tokens,
                    exclude_special=not args.keep_special, progress=not args.no_progress,
                    metadata={"model": args.model, "text": args.text})
    print(f"wrote {store.n_tokens:,} tokens × {len(hooks)} hook(s) ({', '.join(hooks)}; d={store.d}) to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------------


def _read_config_file(path: str) -> dict[str, Any]:
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
                  "hook": None, "device": "cpu", "checkpoint_every": 0, "backend": "auto"}


def _train_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Merge defaults < config file < flags into (run options, SAEConfig extras, TrainConfig extras)."""
    options = dict(TRAIN_DEFAULTS)
    sae_extra: dict[str, Any] = {}
    train_extra: dict[str, Any] = {}
    if args.config:
        file = _read_config_file(args.config)
        sae_extra = dict(file.pop("sae", {}))
        train_extra = dict(file.pop("train", {}))
        unknown = set(file) - set(options) - {"data", "out"}
        if unknown:
            raise CLIError(f"unknown key(s) in {args.config}: {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(options))}, data, out, [sae], [train])")
        options.update(file)
    for key in options:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    options["data"] = args.data or options.get("data")
    options["out"] = args.out or options.get("out")
    for key in ("data", "out"):
        if not options[key]:
            raise CLIError(f"--{key} is required (or set {key!r} in the config file)")
    if options["kind"] not in KINDS:
        raise CLIError(f"--kind must be one of {', '.join(KINDS)}, got {options['kind']!r}")
    if int(options["chains"]) > 1 and options["kind"] != "boosting":
        raise CLIError(f"--chains applies to --kind boosting (independent boosting chains), not {options['kind']}")
    if options["bootstrap"] and options["kind"] == "boosting":
        raise CLIError("--bootstrap applies to --kind single or bagging (a boosting stage reads the residual)")
    for key in ("members", "chains", "k", "steps", "batch_size"):
        if int(options[key]) < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {options[key]}")
    return options, sae_extra, train_extra


def _train(args: argparse.Namespace) -> int:
    import torch

    from .config import SAEConfig, TrainConfig
    from .ensemble import Ensemble
    from .sae import SAE
    from .store import ActivationStore
    from .train import train

    options, sae_extra, train_extra = _train_options(args)
    store = ActivationStore(options["data"], hook=options["hook"])
    latents = options["latents"] or 4 * store.d
    cfg = SAEConfig(d_in=store.d, n_latents=int(latents), k=int(options["k"]), activation=options["activation"],
                    **sae_extra)
    device = torch.device(options["device"])
    from .ops import resolve_backend

    resolve_backend(options["backend"], device, cfg.activation)  # an unusable backend fails before training starts
    if options["kind"] == "single":
        model = SAE(cfg, seed=int(options["seed"]))
    else:
        model = Ensemble(cfg, int(options["members"]), options["kind"], seed=int(options["seed"]),
                         chains=int(options["chains"]))
    model.to(device)
    out = Path(options["out"])
    train_options = {"steps": int(options["steps"]), "lr": float(options["lr"]), "seed": int(options["seed"]),
                     "progress": not args.no_progress, "checkpoint_dir": str(out),
                     "checkpoint_every": int(options["checkpoint_every"]), "resume": args.resume,
                     "backend": options["backend"], **train_extra}
    if options["bootstrap"]:  # the flag or the file's top level; a [train] table may also set it
        train_options["bootstrap"] = True
    config = TrainConfig(**train_options)
    batches = store.batches(int(options["batch_size"]), seed=int(options["data_seed"]), epochs=None,
                            drop_last=store.n_tokens >= int(options["batch_size"]), device=device)
    resumed = args.resume and (out / "config.json").is_file()
    if (out / "config.json").is_file() and not args.resume:
        raise CLIError(f"{out} already holds a trained model; pass --resume to continue it or choose another --out")
    start = time.perf_counter()
    history = train(model, batches, config=config)
    seconds = time.perf_counter() - start
    stages = model.members if options["kind"] == "boosting" else 1
    # A resumed run trained only part of the steps in this process: its rate would be meaningless.
    tokens_per_s = None if resumed else config.steps * stages * int(options["batch_size"]) / seconds
    run = {"kind": options["kind"], "members": getattr(model, "members", 1), "chains": getattr(model, "chains", 1),
           "bootstrap": config.bootstrap, "data": str(options["data"]),
           "hook": store.hook, "sae": cfg.to_dict(), "train": dict(train_options),
           "batch_size": int(options["batch_size"]), "data_seed": int(options["data_seed"]),
           "seconds": seconds, "tokens_per_s": tokens_per_s, "resumed": resumed,
           "final": history[-1] if history else None}
    atomic_write_bytes(out / "run.json", json.dumps(run, indent=2).encode())
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=2).encode())
    final = history[-1] if history else {}
    print(f"trained {options['kind']} ({run['members']} × {cfg.n_latents} latents, k={cfg.k}) on {store.hook}: "
          f"fvu {final.get('fvu', float('nan')):.4f}, l0 {final.get('l0', float('nan')):.1f}, "
          + ("resumed" if resumed else f"{tokens_per_s:,.0f} tokens/s") + f" → {out}")
    return 0


# ------------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load
    from .evaluate import evaluate
    from .store import ActivationStore

    model = load(args.model, map_location=args.device)
    store = ActivationStore(args.data, hook=args.hook)
    if store.d != model.cfg.d_in:
        raise CLIError(f"the model expects d_in={model.cfg.d_in} but {args.data} holds d={store.d} ({store.hook})")
    start = 0 if args.start is None else args.start
    stop = store.n_tokens if args.stop is None else args.stop
    if not 0 <= start < stop <= store.n_tokens:
        raise CLIError(f"--start/--stop must satisfy 0 <= start < stop <= {store.n_tokens}, got {start}, {stop}")
    view = store.subset(start, stop)
    batches = view.batches(args.batch_size, shuffle=False, device=torch.device(args.device))
    from .ops import use_backend

    with use_backend(args.backend):
        result = evaluate(model, batches)
    result.update(model=str(args.model), data=str(args.data), hook=store.hook, start=start, stop=stop)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction"):
        print(f"{key:>20}: {result[key]:.6g}")
    print(f"{'tokens':>20}: {result['n_tokens']:,}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
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
    config.validate()
    print(f"saefast demo — real activations: {config.model}, layer {config.layer}, text {config.text!r}; "
          f"{config.train_tokens:,} training + {config.eval_tokens:,} held-out tokens", flush=True)
    report = run_demo(config, args.out, cache_dir=args.cache, progress=not args.no_progress)
    data = report["data"]
    print(("reused cached activations from " if data["reused_cached_activations"] else "harvested activations to ")
          + data["store"])
    print(format_table(report["rows"]))
    print(f"wrote {args.out}/results.json and {args.out}/members.png")
    return 0


# ------------------------------------------------------------------------------------------------------
# sharpen
# ------------------------------------------------------------------------------------------------------


def _sharpen(args: argparse.Namespace) -> int:
    from .sharpen_tasks import format_history, run_task

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

    report = run_task(args.task, out=args.out, seed=args.seed, log=log, **overrides)
    print(format_history(report["history"]))
    print(f"wrote {args.out}/results.json, {args.out}/history.png and each cycle's SAE and masks")
    return 0


# ------------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from .bench import BACKENDS, CASES, format_markdown, plot_report, run_benchmarks

    def progress(what: str) -> None:
        if not args.no_progress:
            print(f"  {what}", file=sys.stderr, flush=True)

    report = run_benchmarks(args.preset, cases=args.cases or CASES, backends=args.backends or BACKENDS,
                            warmup=args.warmup, repeats=args.repeats, device=args.device, progress=progress)
    table = format_markdown(report)
    print(table)
    for path, data in ((args.json, json.dumps(report, indent=2).encode()), (args.markdown, (table + "\n").encode())):
        if path:
            atomic_write_bytes(path, data)
            print(f"wrote {path}")
    if args.png:
        plot_report(report, args.png)
        print(f"wrote {args.png}")
    return 0


# ------------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saefast`` command."""
    parser = argparse.ArgumentParser(prog="saefast", description="Train and apply ensembles of sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)

    h = commands.add_parser("harvest", help="run a model over text and store activations at hook points",
                            description="Harvest activations from a local/embedded model into an on-disk store "
                            "(resumes an interrupted harvest into the same --out).")
    h.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M) or a local Hugging Face directory / .gguf file")
    h.add_argument("--layer", type=int, help="decoder block whose output to store (default: the middle one)")
    h.add_argument("--hook", action="append", help="module name or glob pattern (repeatable) instead of --layer")
    h.add_argument("--tokens", type=int, default=100_000, help="token budget (default: 100000)")
    h.add_argument("--out", required=True, help="store directory")
    h.add_argument("--text", default="pydoc", help="'pydoc' (the stdlib's pydoc topics) or .txt files/directories, "
                   "comma-separated")
    h.add_argument("--context", type=int, default=256, help="tokens per window, BOS included (default: 256)")
    h.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    h.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="storage dtype (default: bfloat16)")
    h.add_argument("--shard-tokens", type=int, default=65_536, help="tokens per shard file (default: 65536)")
    h.add_argument("--keep-special", action="store_true", help="keep BOS/pad positions (excluded by default)")
    h.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    h.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    h.set_defaults(run=_harvest)

    t = commands.add_parser("train", help="train a single SAE or a bagging/boosting ensemble on a store",
                            description="Train on an activation store; flags override a JSON/TOML --config file "
                            "(top-level keys as the flags, plus [sae] SAEConfig and [train] TrainConfig tables).")
    t.add_argument("--data", help="activation store directory (from `saefast harvest`)")
    t.add_argument("--out", help="run directory: checkpoint, history.json, run.json")
    t.add_argument("--config", help="JSON or TOML file of options")
    t.add_argument("--kind", choices=KINDS, help="single | bagging | boosting (default: single)")
    t.add_argument("--members", type=int, help="ensemble size J (default: 4)")
    t.add_argument("--chains", type=int, help="boosting: independent chains of J stages trained at once (default: 1)")
    t.add_argument("--bootstrap", action="store_true", default=None,
                   help="single/bagging: each member trains on its own bootstrap resample of every batch")
    t.add_argument("--latents", type=int, help="latents per SAE / per member (default: 4 × d)")
    t.add_argument("--k", type=int, help="top-k (default: 32)")
    t.add_argument("--activation", choices=("topk", "batchtopk", "relu", "jumprelu"), help="default: topk")
    t.add_argument("--steps", type=int, help="optimizer steps (per stage for boosting; default: 1000)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3)")
    t.add_argument("--batch-size", type=int, help="tokens per batch (default: 1024)")
    t.add_argument("--seed", type=int, help="model seed (member j uses seed + j; default: 0)")
    t.add_argument("--data-seed", type=int, help="seed of the shuffled data order (default: 0)")
    t.add_argument("--hook", help="which hook of a multi-hook store")
    t.add_argument("--device", help="torch device (default: cpu)")
    t.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: only at the end)")
    t.add_argument("--resume", action="store_true", help="resume from the checkpoint in --out")
    t.add_argument("--backend", choices=("auto", "torch", "triton", "native"),
                   help="op backend (default: auto = triton on CUDA, native on the CPU, else torch)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(run=_train)

    e = commands.add_parser("eval", help="evaluate a trained run on a store",
                            description="Reconstruction and sparsity metrics of a trained model on stored activations.")
    e.add_argument("--model", required=True, help="run / checkpoint directory (from `saefast train`)")
    e.add_argument("--data", required=True, help="activation store directory")
    e.add_argument("--json", help="write the metrics to this file")
    e.add_argument("--hook", help="which hook of a multi-hook store")
    e.add_argument("--start", type=int, help="first token row (default: 0)")
    e.add_argument("--stop", type=int, help="end token row (default: all)")
    e.add_argument("--batch-size", type=int, default=4096, help="tokens per batch (default: 4096)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--backend", choices=("auto", "torch", "triton", "native"), default="auto",
                   help="op backend (default: auto)")
    e.set_defaults(run=_eval)

    d = commands.add_parser("demo", help="harvest SmolLM2-135M activations; compare single / bagging / boosting",
                            description="The main job: harvest (or reuse) real activations, train a single SAE, a "
                            "bagging and a boosting ensemble, print the table, write results.json and members.png.")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--cache", help="activation cache directory (default: OUT/activations)")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small, fast run")
    size.add_argument("--large", action="store_true", help="a bigger run (4 × d latents, 1000 steps, ~100k tokens)")
    d.add_argument("--model", help="embedded name or local model path (default: smollm2)")
    d.add_argument("--layer", type=int, help="decoder block to harvest (default: 15)")
    d.add_argument("--text", help="'pydoc' or .txt files/directories, comma-separated")
    d.add_argument("--tokens", type=int, help="training tokens")
    d.add_argument("--steps", type=int, help="optimizer steps per model (per stage for boosting)")
    d.add_argument("--members", type=int, help="ensemble size")
    d.add_argument("--latents", type=int, help="latents per member")
    d.add_argument("--k", type=int, help="top-k")
    d.add_argument("--seed", type=int, help="seed")
    d.add_argument("--no-stability", action="store_true", help="skip the second-seed runs (halves training time)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(run=_demo)

    s = commands.add_parser("sharpen", help="SAE-ception: sharpen a classifier's layer with its SAE, in cycles",
                            description="Train the task's classifier (baseline), then for each cycle: train an SAE on "
                            "the hooked layer, pick each class's top-N latents, fine-tune with the cosine loss to the "
                            "sharpened targets. Prints accuracy and class-structure metrics per cycle.")
    s.add_argument("--task", choices=("digits", "fortunes"), default="digits",
                   help="digits: MLP 64-16-16-10 on scikit-learn's 8x8 digits (default); fortunes: SmolLM2-135M on "
                   "Debian fortunes categories (apt-get install fortunes)")
    s.add_argument("--out", default="sharpen_out", help="output directory (default: sharpen_out)")
    s.add_argument("--cycles", type=int, help="sharpening cycles after the baseline (default: 2)")
    s.add_argument("--target", choices=("class", "complement", "example", "random"),
                   help="class (SAE-ception, default) or a control: complement mask, per-example top-N, random unit "
                   "vectors")
    picks = s.add_mutually_exclusive_group()
    picks.add_argument("--top-n", type=int, help="latents kept per class (default: 25)")
    picks.add_argument("--top-percent", type=float, help="instead: this percentage of the latents per class")
    s.add_argument("--aux-coef", type=float, help="weight λ of the cosine loss (task default)")
    s.add_argument("--members", type=int, help="SAEs per cycle (an ensemble when > 1; default: 1)")
    s.add_argument("--combine", choices=("bagging", "boosting"), help="how ensemble members combine")
    s.add_argument("--epochs", type=int, help="baseline task epochs")
    s.add_argument("--finetune-epochs", type=int, help="task epochs per cycle")
    s.add_argument("--sae-steps", type=int, help="SAE optimizer steps per cycle")
    s.add_argument("--backend", choices=("auto", "torch", "triton", "native"), help="op backend of the SAE work")
    s.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(run=_sharpen)

    from .bench import BACKENDS, CASES, PRESETS

    b = commands.add_parser("bench", help="benchmark the cases on every available backend against eager PyTorch",
                            description=f"Cases {' / '.join(CASES)} on the backends {' / '.join(BACKENDS)}; each "
                            "backend is checked against eager before it is timed. Writes JSON, a markdown table and "
                            "a PNG chart.")
    b.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="shapes (default: cpu-small)")
    b.add_argument("--json", help="write the report (JSON) here")
    b.add_argument("--markdown", help="write the markdown table here")
    b.add_argument("--png", help="write the bar chart here")
    b.add_argument("--cases", nargs="+", choices=CASES, help="default: all")
    b.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: all (unavailable ones report why)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls per backend (default: 1)")
    b.add_argument("--repeats", type=int, default=5, help="timed calls per backend (default: 5; the median counts)")
    b.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--no-progress", action="store_true", help="do not print the case being run")
    b.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a one-line error with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, CheckpointError, FileNotFoundError, KeyError, OSError, ImportError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"saefast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
