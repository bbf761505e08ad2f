"""saefast: kernel-backed training and application of ensembles of sparse autoencoders.

Public API::

    cfg = SAEConfig(d_in=64, n_latents=512, k=16, activation="topk")
    bag = Ensemble.bagging(cfg, members=4, seed=0)       # or Ensemble.boosting(...), SAE(cfg, seed=0)
    history = train(bag, batches, steps=200, lr=1e-3)
    x_hat, codes = bag.reconstruct(x), bag.encode(x)
    metrics = evaluate(bag, x)
    bag.save("ckpt/"); again = load("ckpt/")

    model, tokenizer = load_model("smollm2")              # embedded SmolLM2-135M, offline
    store = harvest(model, "acts/", "model.layers.15", tokens=100_000, tokenizer=tokenizer, texts=pydoc_topics())
    train(bag, store.batches(1024, epochs=None), steps=1000)

    browse(bag, store, "site/")                                 # the feature browser: open site/index.html
    stats = sharpen.class_stats(bag, labelled_batches)          # SAE-ception: (x, labels) batches
    t = sharpen.targets(bag, x, labels, sharpen.class_masks(stats, top_n=25))   # sharpened targets [N, d]

The packages, bottom up: ``ops`` (backends, kernels' Python side, the eager oracle ``ops.ref``), ``data`` (hooks,
harvest, stores), ``models`` (SAE, Ensemble, checkpoints), ``training``, ``eval``, ``sharpen``, ``bench``, ``cli``.
The module paths of earlier versions (``saefast.store``, ``saefast.train``, ``saefast.ref``, ...) still import.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from . import config, devices, files, ops, sharpen, training, validation  # noqa: F401  (saefast.config etc. as attributes)
from .browse import browse
from .config import ACTIVATIONS, SAEConfig, TrainConfig
from .data import hf, store, text
from .data.harvest import harvest
from .data.hf import load_model
from .data.hooks import layer_hook, resolve_hooks
from .data.store import ActivationStore, StoreError, StoreWriter, write_store
from .data.text import pydoc_topics, text_source
from .eval import metrics
from .eval.evaluate import evaluate
from .formats import load, save
from .models import checkpoint, dictionary, ensemble, sae
from .models.checkpoint import CheckpointError
from .models.ensemble import Ensemble
from .models.sae import SAE
from .ops import codes, native, ref, use_backend
from .ops.codes import SparseCodes
from .training import DataExhausted, train
from .training import memory as cpu
from .version import __version__  # noqa: F401

# Where the modules of earlier versions live now. `saefast.train`, `saefast.evaluate` and `saefast.harvest` stay
# the functions (as before); their old module paths still import (`from saefast.train import bootstrap_indices`).
_harvest_module = importlib.import_module(".data.harvest", __name__)  # `data.harvest` is the function there
_evaluate_module = importlib.import_module(".eval.evaluate", __name__)
_MOVED = {
    "codes": codes, "ref": ref, "native": native, "dictionary": dictionary, "sae": sae, "ensemble": ensemble,
    "checkpoint": checkpoint, "harvest": _harvest_module, "hf": hf, "text": text, "store": store, "train": training,
    "cpu": cpu, "metrics": metrics, "evaluate": _evaluate_module,
}
for _old, _module in _MOVED.items():
    sys.modules[f"{__name__}.{_old}"] = _module

# Moved modules that are imported only on use (optional dependencies: scikit-learn, matplotlib, transformers).
_MOVED_ON_USE = {
    "class_metrics": "saefast.eval.class_metrics", "classifiers": "saefast.sharpen.classifiers",
    "sharpen_tasks": "saefast.sharpen.tasks", "demo": "saefast.cli.demo", "synthetic": "saefast.data.synthetic",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import saefast.<old name>`` gives the module at its new path (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == __name__ and name in _MOVED_ON_USE:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_MOVED_ON_USE[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "ACTIVATIONS",
    "ActivationStore",
    "CheckpointError",
    "DataExhausted",
    "Ensemble",
    "SAE",
    "SAEConfig",
    "SparseCodes",
    "StoreError",
    "StoreWriter",
    "TrainConfig",
    "browse",
    "cpu",
    "evaluate",
    "harvest",
    "layer_hook",
    "load",
    "load_model",
    "metrics",
    "native",
    "ops",
    "pydoc_topics",
    "ref",
    "resolve_hooks",
    "save",
    "sharpen",
    "text_source",
    "train",
    "use_backend",
    "write_store",
]
