"""The argument parser of the ``saefast`` command."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..version import __version__
from .browse import run_browse
from .commands import (
    DTYPES,
    KINDS,
    run_bench,
    run_demo,
    run_harvest,
    run_sharpen,
    run_train,
)
from .compare import run_compare
from .convert import run_convert
from .evaluate import run_eval


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _whole(text, 0)


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``saefast <command>: error: …``, exit status 2 (like
    every other bad input), instead of the usage text followed by the error."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saefast`` command."""
    parser = OneLineErrors(prog="saefast", description="Train and apply ensembles of sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"saefast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    h = commands.add_parser("harvest", help="run a model over text and store activations at hook points",
                            description="Harvest activations from a local/embedded model into an on-disk store "
                            "(resumes an interrupted harvest into the same --out).")
    h.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M) or a local Hugging Face directory / .gguf file")
    h.add_argument("--layer", type=non_negative_int,
                   help="decoder block whose output to store (default: the middle one)")
    h.add_argument("--hook", action="append", help="module name or glob pattern (repeatable) instead of --layer")
    h.add_argument("--tokens", type=positive_int, default=100_000, help="token budget (default: 100000)")
    h.add_argument("--out", required=True, help="store directory")
    h.add_argument("--text", default="pydoc", help="'pydoc' (the stdlib's pydoc topics) or .txt files/directories, "
                   "comma-separated")
    h.add_argument("--context", type=positive_int, default=256, help="tokens per window, BOS included (default: 256)")
    h.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default: 8)")
    h.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="storage dtype (default: bfloat16)")
    h.add_argument("--shard-tokens", type=positive_int, default=65_536, help="tokens per shard file (default: 65536)")
    h.add_argument("--keep-special", action="store_true", help="keep BOS/pad positions (excluded by default)")
    h.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    h.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    h.set_defaults(run=run_harvest)

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
    t.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: 0, none)")
    t.add_argument("--checkpoint-minutes", type=float,
                   help="checkpoint every N minutes of wall time (default: 5; 0: none); a checkpoint is also written "
                   "at the end and when SIGINT/SIGTERM stops the run")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the same settings (bit for bit on CPU)")
    t.add_argument("--backend", choices=("auto", "torch", "triton", "native"),
                   help="op backend (default: auto = triton on CUDA, native on the CPU, else torch)")
    t.add_argument("--parallel", choices=("members", "data", "members,data"),
                   help="under torchrun: split the ensemble's members (bagging members, boosting chains; bit-exact), "
                   "each batch's tokens (gradients all-reduced), or both on a members × data mesh")
    t.add_argument("--member-shards", type=int,
                   help="--parallel members,data: ranks the members are split over (default: √P for a square P)")
    t.add_argument("--nproc", type=int,
                   help="start torchrun with this many processes on this machine for you (needs --parallel)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(run=run_train)

    b = commands.add_parser("browse", help="the feature browser: a static HTML site of what each latent means",
                            description="One streaming pass over a store: per latent its top-activating contexts, "
                            "examples across its activation range, histogram, firing frequency, the tokens its "
                            "decoder row promotes (with the harvest's language model), and for ensembles its "
                            "nearest latents in the other members. Writes OUT/index.html (opens from file://).")
    b.add_argument("--model", required=True, help="run / checkpoint directory, or another library's SAE folder")
    b.add_argument("--data", required=True, help="activation store (from `saefast harvest`: it has the token ids)")
    b.add_argument("--out", required=True, help="directory for the site")
    b.add_argument("--hook", help="which hook of a multi-hook store (default: the run's)")
    b.add_argument("--top-n", type=int, default=10, help="top-activating contexts per latent (default: 10)")
    b.add_argument("--per-band", type=int, default=3,
                   help="examples from each quartile band of a latent's activations (default: 3)")
    b.add_argument("--width", type=int, default=8, help="tokens shown either side of an example (default: 8)")
    b.add_argument("--max-tokens", type=int, help="scan only the store's first N tokens")
    b.add_argument("--lm", help="language model for token strings and logits (default: the store's, offline)")
    b.add_argument("--no-lm", action="store_true", help="no language model: token ids, no logits")
    b.add_argument("--title", help="the site's title")
    b.add_argument("--classes", help="an SAE-ception cycle's masks.safetensors (saefast sharpen's "
                   "OUT/cycle_<c>/masks.safetensors, with --model OUT/cycle_<c>/sae): list each class's sharpened "
                   "latents")
    b.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    b.add_argument("--backend", choices=("auto", "torch", "triton", "native"), help="op backend (default: auto)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    b.set_defaults(run=run_browse)

    e = commands.add_parser("eval", help="evaluate a trained run: reconstruction on a store, spliced LM cost, sparse "
                            "probing, spurious-correlation removal",
                            description="Reconstruction and sparsity metrics of a trained model on stored activations "
                            "(--data), the language-model cost of splicing it into a layer (--spliced), sparse "
                            "probing on real labelled text (--probing) and spurious-correlation removal (--scr). "
                            "The results also go to RUN/eval.json, which `saefast compare` reads.")
    e.add_argument("--model", required=True, help="run / checkpoint directory (from `saefast train`), or another "
                   "library's SAE folder (SAELens, sparsify, dictionary_learning, OpenAI; detected from its files)")
    e.add_argument("--data", help="activation store directory: reconstruction and sparsity on its rows")
    e.add_argument("--json", help="write the metrics to this file")
    e.add_argument("--hook", help="which hook of a multi-hook store")
    e.add_argument("--start", type=non_negative_int, help="first token row (default: 0)")
    e.add_argument("--stop", type=positive_int, help="end token row (default: all)")
    e.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per batch (default: 4096)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--backend", choices=("auto", "torch", "triton", "native"), default="auto",
                   help="op backend (default: auto)")
    lm = e.add_argument_group("spliced LM evaluation", "replace a language model layer's output with the model's "
                              "reconstruction on held-out text: CE and KL against the clean and zero-ablated model")
    lm.add_argument("--spliced", action="store_true", help="run the spliced evaluation")
    lm.add_argument("--lm", default="smollm2", help="'smollm2' (embedded) or a local model (default: smollm2)")
    lm.add_argument("--layer", type=non_negative_int,
                    help="decoder block to splice into (default: the hook the run was trained on)")
    lm.add_argument("--text", default="pydoc", help="held-out text: 'pydoc' or .txt files/directories (default: "
                    "pydoc; use text or --skip-windows the training never saw)")
    lm.add_argument("--tokens", type=positive_int, default=8192, help="tokens to evaluate on (default: 8192)")
    lm.add_argument("--context", type=positive_int, default=128, help="tokens per window (default: 128)")
    lm.add_argument("--skip-windows", type=non_negative_int, default=0,
                    help="skip the text's first N windows (e.g. those harvested for training; default: 0)")
    lm.add_argument("--lm-batch-size", type=positive_int, default=8, help="windows (or texts) per forward "
                    "(default: 8)")
    probe = e.add_argument_group("sparse probing and SCR", "example-level tasks on real offline text "
                                 "(Debian fortunes, source files on the machine): each text's codes mean-pooled over "
                                 "its tokens")
    probe.add_argument("--probing", action="store_true", help="sparse probing: top-k latents by class mean "
                       "difference, a logistic-regression probe on them, test accuracy (and the raw-activation "
                       "probe)")
    probe.add_argument("--scr", action="store_true", help="spurious-correlation removal (SHIFT): ablate the latents "
                       "of a spurious attribute, score the biased probe's recovery S")
    probe.add_argument("--datasets", nargs="+", metavar="NAME",
                       help="probing datasets (default: fortune-topics fortune-languages code-languages)")
    probe.add_argument("--per-class", type=positive_int, default=300, help="texts per class (default: 300)")
    probe.add_argument("--probe-k", type=positive_int, nargs="+", metavar="K",
                       help="latents per probe (default: 1 2 5 10 20)")
    probe.add_argument("--probe-seed", type=int, default=0, help="seed of the samples and splits (default: 0)")
    probe.add_argument("--example-tokens", type=positive_int, default=64,
                       help="tokens per text, BOS included (default: 64)")
    probe.add_argument("--scr-target", metavar="A,B", help="the two fortune categories of the SCR target "
                       "(default: computers,science); the spurious attribute is an attribution line")
    probe.add_argument("--scr-per-cell", type=positive_int, default=200,
                       help="SCR texts per (target, spurious) cell (default: 200)")
    probe.add_argument("--cache", help="keep the texts' activations here, for the next evaluation at the same layer")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    e.set_defaults(run=run_eval)

    c = commands.add_parser("compare", help="the paper-style table of evaluated runs: mean ± 95%% CI over seeds",
                            description="Group evaluated runs (RUN/eval.json from `saefast eval`) by kind, members, "
                            "latents and k; report every metric as mean ± the 95%% Student-t interval over seeds, "
                            "stability over pairs of seeds, and which ensemble-vs-baseline differences the intervals "
                            "decide. SAEs are named single or expanded (J·M latents, J·k or k active) from the "
                            "ensembles beside them.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run directories (saefast runs or other "
                   "libraries' SAE folders, each with the eval.json of `saefast eval`)")
    c.add_argument("--json", help="write the comparison (every group, metric and claim) here")
    c.add_argument("--markdown", help="write the table and the claims as markdown here")
    c.add_argument("--png", help="draw the metrics against the number of members here")
    c.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    c.set_defaults(run=run_compare)

    v = commands.add_parser("convert", help="convert an SAE between saefast, SAELens, sparsify, dictionary_learning "
                            "and OpenAI formats",
                            description="Load SRC (a saefast run or checkpoint, or another library's SAE, detected "
                            "from its files) and write it to OUT in --to's format, without retraining. From a saefast "
                            "run, the model name, hook, context size and dtype come from the harvest's record.")
    v.add_argument("src", metavar="SRC", help="the SAE to convert (a folder, or a file for single-file formats)")
    v.add_argument("out", metavar="OUT", help="a new (or empty) directory to write")
    v.add_argument("--from", dest="source_format", metavar="FORMAT",
                   help="SRC's format: saefast, saelens, sparsify, dictionary_learning, openai (default: detected)")
    v.add_argument("--to", required=True, metavar="FORMAT", help="the format to write: saefast, saelens, sparsify")
    v.add_argument("--model-name", help="the language model's name to record (default: from the run's harvest)")
    v.add_argument("--hook-name", help="the hook to record (default: the run's hook)")
    v.add_argument("--context-size", type=positive_int, help="the context size to record (default: the harvest's)")
    v.set_defaults(run=run_convert)

    d = commands.add_parser("demo", help="harvest SmolLM2-135M activations; compare single / expanded / bagging / "
                            "boosting",
                            description="The main job: harvest (or reuse) real activations, train a single SAE, the "
                            "expanded SAE (J·M latents, J·k active), a bagging and a boosting ensemble, print the "
                            "table (with the spliced CE/KL scores on held-out text), write results.json and "
                            "members.png.")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--cache", help="activation cache directory (default: OUT/activations)")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small, fast run")
    size.add_argument("--large", action="store_true", help="a bigger run (4 × d latents, 1000 steps, ~100k tokens)")
    d.add_argument("--model", help="embedded name or local model path (default: smollm2)")
    d.add_argument("--layer", type=non_negative_int, help="decoder block to harvest (default: 15)")
    d.add_argument("--text", help="'pydoc' or .txt files/directories, comma-separated")
    d.add_argument("--tokens", type=positive_int, help="training tokens")
    d.add_argument("--steps", type=positive_int, help="optimizer steps per model (per stage for boosting)")
    d.add_argument("--members", type=positive_int, help="ensemble size")
    d.add_argument("--latents", type=positive_int, help="latents per member")
    d.add_argument("--k", type=positive_int, help="top-k")
    d.add_argument("--seed", type=int, help="seed")
    d.add_argument("--no-stability", action="store_true", help="skip the second-seed runs (halves training time)")
    d.add_argument("--spliced-tokens", type=non_negative_int,
                   help="held-out tokens of the spliced CE/KL columns (default: 4096; 0: no spliced columns)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(run=run_demo)

    s = commands.add_parser("sharpen", help="SAE-ception: sharpen a classifier's layer with its SAE, in cycles",
                            description="Train the task's classifier (baseline), then for each cycle: train an SAE on "
                            "the hooked layer, pick each class's top-N latents, fine-tune with the cosine loss to the "
                            "sharpened targets. Prints accuracy and class-structure metrics per cycle.")
    s.add_argument("--task", choices=("digits", "fortunes"), default="digits",
                   help="digits: MLP 64-16-16-10 on scikit-learn's 8x8 digits (default); fortunes: SmolLM2-135M on "
                   "Debian fortunes categories (apt-get install fortunes)")
    s.add_argument("--out", default="sharpen_out", help="output directory (default: sharpen_out)")
    s.add_argument("--cycles", type=non_negative_int, help="sharpening cycles after the baseline (default: 2)")
    s.add_argument("--target", choices=("class", "complement", "example", "random"),
                   help="class (SAE-ception, default) or a control: complement mask, per-example top-N, random unit "
                   "vectors")
    picks = s.add_mutually_exclusive_group()
    picks.add_argument("--top-n", type=positive_int, help="latents kept per class (default: 25)")
    picks.add_argument("--top-percent", type=float, help="instead: this percentage of the latents per class")
    s.add_argument("--aux-coef", type=float, help="weight λ of the cosine loss (task default)")
    s.add_argument("--members", type=positive_int, help="SAEs per cycle (an ensemble when > 1; default: 1)")
    s.add_argument("--combine", choices=("bagging", "boosting"), help="how ensemble members combine")
    s.add_argument("--epochs", type=non_negative_int, help="baseline task epochs")
    s.add_argument("--finetune-epochs", type=non_negative_int, help="task epochs per cycle")
    s.add_argument("--sae-steps", type=positive_int, help="SAE optimizer steps per cycle")
    s.add_argument("--backend", choices=("auto", "torch", "triton", "native"), help="op backend of the SAE work")
    s.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last complete cycle (same settings; same results)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(run=run_sharpen)

    from ..bench import CASES, IMPLEMENTATIONS, PRESETS

    b = commands.add_parser("bench", help="benchmark the cases on every available backend against eager PyTorch",
                            description=f"Cases {' / '.join(CASES)} on the implementations "
                            f"{' / '.join(IMPLEMENTATIONS)}; each is checked against eager before it is timed. Writes "
                            "JSON, a markdown table and a PNG chart.")
    b.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="shapes (default: cpu-small)")
    b.add_argument("--json", help="write the report (JSON) here")
    b.add_argument("--markdown", help="write the markdown table here")
    b.add_argument("--png", help="write the bar chart here")
    b.add_argument("--cases", nargs="+", choices=(*CASES, "data"),
                   help="default: all but data; data times the activation-store reader (store.batches) at d = 576 "
                        "and 2,304, cold and warm, bf16 and fp32 output, 1 and 2 workers")
    b.add_argument("--data-mib", type=positive_int, default=384,
                   help="data case: MiB of each temporary bf16 store (default: 384)")
    b.add_argument("--data-dir", help="data case: where to write the temporary stores (default: the temp dir)")
    b.add_argument("--backends", nargs="+", choices=IMPLEMENTATIONS,
                   help="implementations to time (default: all; unavailable ones report why)")
    b.add_argument("--warmup", type=non_negative_int, default=1,
                   help="untimed calls per backend (default: 1)")
    b.add_argument("--repeats", type=positive_int, default=5,
                   help="timed calls per backend (default: 5; the median counts)")
    b.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--no-progress", action="store_true", help="do not print the case being run")
    b.add_argument("--verbose", action="store_true",
                   help="also show torch.compile's warnings and the profiler's native log lines (hidden by default)")
    b.set_defaults(run=run_bench)
    return parser
