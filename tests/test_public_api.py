"""The public API: the names of ``import saefast as sf``, of every module path users import (the module paths of
earlier versions included: ``saefast.store``, ``saefast.train``, ``saefast.ref``, ...), and of the packages.

Renamed for clarity, with no alias: ``ops.decode_members`` (sparse codes) is ``ops.decode_members_sparse``,
``ref.decode_members`` (dense codes) is ``ref.decode_members_dense``, and ``bench.BACKENDS`` (what a case is timed
on, not an op backend) is ``bench.IMPLEMENTATIONS``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import saefast as sf

TOP_LEVEL = ["ACTIVATIONS", "ActivationStore", "CheckpointError", "DataExhausted", "Ensemble", "SAE", "SAEConfig",
             "SparseCodes", "StoreError", "StoreWriter", "TrainConfig", "browse", "cpu", "evaluate", "harvest",
             "layer_hook", "load", "load_model", "metrics", "native", "ops", "pydoc_topics", "ref", "resolve_hooks",
             "save", "sharpen", "text_source", "train", "use_backend", "write_store"]

PUBLIC = {
    # the module paths of earlier versions
    "saefast.bench": ["CASES", "Case", "IMPLEMENTATIONS", "PRESETS", "Shape", "device_peaks", "format_markdown",
                      "git_revision", "guard", "make_case", "plot_report", "reference_output", "run_benchmarks",
                      "time_interleaved", "token_batches", "unavailable"],
    "saefast.checkpoint": ["CONFIG_FILE", "CheckpointError", "FORMAT", "VERSION", "load", "load_checkpoint",
                           "read_config", "save", "save_checkpoint"],
    "saefast.class_metrics": ["adjusted_rand_index", "argmax_latent", "calinski_harabasz", "class_selectivity_index",
                              "class_structure", "davies_bouldin", "silhouette", "uncertainty_coefficient"],
    "saefast.classifiers": ["DigitsMLP", "DigitsSplit", "SmolLM2Classifier", "TextSplit", "digits_splits",
                            "stratified_split", "text_splits", "tokenize"],
    "saefast.cli": ["CLIError", "DTYPES", "KINDS", "TRAIN_DEFAULTS", "build_parser", "main"],
    "saefast.codes": ["SparseCodes"],
    "saefast.config": ["ACTIVATIONS", "Activation", "BDecInit", "Decay", "SAEConfig", "TrainConfig"],
    "saefast.cpu": ["reuse_freed_memory"],
    "saefast.demo": ["DemoConfig", "KINDS", "cache_path", "format_table", "plot_members", "prepare_activations",
                     "run_demo"],
    "saefast.devices": ["check_device", "to_device"],
    "saefast.dictionary": ["SparseDictionary", "Stacked", "StepTerms", "cat_codes", "init_dictionary"],
    "saefast.ensemble": ["Combine", "Ensemble"],
    "saefast.evaluate": ["evaluate"],
    "saefast.browse": ["browse", "collect", "contexts", "write_site"],
    "saefast.distributed": ["DistributedError", "Layout", "TokenShards", "agree_on_errors", "init_from_env",
                            "make_layout", "mesh_shape", "torchrun_group"],
    "saefast.formats": ["FORMATS", "FormatError", "WRITABLE", "available_formats", "detect_format", "load", "save"],
    "saefast.harvest": ["Capture", "FORMAT", "TOKEN_IDS", "VERSION", "abbreviate_names", "decoder_blocks", "harvest",
                        "layer_hook", "model_fingerprint", "model_label", "resolve_hooks", "special_token_ids"],
    "saefast.hf": ["EMBEDDED_MODELS", "SOURCE_ATTR", "load_model", "resolve_model_source"],
    "saefast.metrics": ["FiringWindow", "ReconstructionStats", "connectivity", "dead_latent_fraction", "diversity",
                        "explained_variance", "explained_variance_per_dim", "fvu", "l0", "l0_total",
                        "max_abs_cosine_to_others", "member_similarity", "mse", "relaxed_stability"],
    "saefast.native": ["available", "has_cuda", "supports", "why_unavailable"],
    "saefast.ops": ["BACKENDS", "BATCHTOPK_CAPACITY", "CHUNK_LATENTS", "FUSED_ACTIVATIONS",
                    "JUMPRELU_CAPACITY_DIVISOR", "JUMPRELU_MIN_CAPACITY", "SparseCodes", "adam_step_",
                    "batchtopk_encode",
                    "current_backend", "dead_latents", "decode", "decode_members_sparse", "folded_bias", "grouped_mm",
                    "jumprelu_capacity", "jumprelu_encode", "per_member_inputs", "relu_encode",
                    "remove_parallel_grad_", "resolve_backend", "threshold_encode", "topk_encode",
                    "topk_over_latents", "triton_available", "use_backend"],
    "saefast.ref": ["adam_step_", "auxk_reconstruction", "batchtopk_activation", "decode_codes", "decode_members_dense",
                    "decode_members_sparse", "decode_sparse", "fvu_loss", "geometric_median", "jumprelu_activation",
                    "jumprelu_l0", "member_weights", "normalize_rows_", "pre_activations", "relu_activation",
                    "remove_parallel_grad_", "threshold_activation", "topk_activation", "topk_codes"],
    "saefast.sae": ["SAE"],
    "saefast.sharpen": ["AuxiliaryLoss", "ClassStats", "SAECeption", "SharpenConfig", "Split", "TARGETS", "Target",
                        "class_masks", "class_stats", "cosine_loss", "example_targets", "random_targets", "targets",
                        "targets_reference"],
    "saefast.sharpen_tasks": ["BUILDERS", "COLUMNS", "TASKS", "Task", "digits_task", "format_history",
                              "fortunes_task", "plot_history", "run_task"],
    "saefast.store": ["ActivationStore", "EXTRA_DTYPES", "FORMAT", "MANIFEST", "SINGLE_HOOK", "STORE_DTYPES",
                      "StoreBatches", "StoreError", "StoreWriter", "VERIFY_MODES", "VERSION", "write_store"],
    "saefast.synthetic": ["SyntheticSparseData", "feature_recovery"],
    "saefast.text": ["DEFAULT_FORTUNE_CATEGORIES", "FORTUNES_ROOT", "PYDOC", "TokenWindows", "fortune_categories",
                     "fortunes", "pydoc_topics", "read_text_files", "text_source", "token_windows", "tokenize_stream"],
    "saefast.train": ["BatchStream", "DataExhausted", "bootstrap_indices", "train"],
    "saefast.validation": ["changed_fields", "check_activations"],
    # the packages
    "saefast.interrupts": ["Interrupted", "Interval", "SIGNALS", "StopRequest", "deferred_interrupts"],
    "saefast.files": ["atomic_write", "atomic_write_bytes", "current_umask", "fsync_dir", "read_versioned_json",
                      "sha256_bytes", "sha256_file"],
    "saefast.data": ["TOKEN_IDS", "ActivationStore", "Capture", "StoreError", "StoreWriter", "abbreviate_names",
                     "decoder_blocks", "harvest", "layer_hook", "load_model", "pydoc_topics", "resolve_hooks",
                     "text_source", "write_store"],
    "saefast.models": ["ALL_MEMBERS", "SAE", "CheckpointError", "Ensemble", "SparseDictionary", "Stacked",
                       "StepTerms", "load", "load_checkpoint", "save", "save_checkpoint"],
    "saefast.training": ["BatchStream", "DataExhausted", "SAEAdam", "bootstrap_indices", "differences",
                         "reuse_freed_memory", "train", "training_step"],
    "saefast.eval": ["ablate_rows", "compare_intervals", "decoder_directions", "evaluate", "fit_probe", "format_ci",
                     "loss_scores", "mean_ci", "metrics", "one_vs_rest_splits", "pooled_codes", "probe_accuracy",
                     "shift_score", "sparse_probing", "splice", "spliced_lm", "spurious_correlation_removal",
                     "summarize", "top_k_latents"],
}


def test_the_top_level_names():
    assert sorted(sf.__all__) == sorted(TOP_LEVEL)
    missing = [name for name in TOP_LEVEL if not hasattr(sf, name)]
    assert not missing, missing
    assert callable(sf.train) and callable(sf.evaluate) and callable(sf.harvest)  # functions, not the modules
    assert sf.__version__


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_imports_from_its_module(module):
    loaded = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} lacks {missing}"


def test_old_module_paths_are_the_new_modules():
    """An old path gives the same module object as the new one: no second copy with its own state."""
    pairs = {"saefast.store": "saefast.data.store", "saefast.train": "saefast.training",
             "saefast.ref": "saefast.ops.ref", "saefast.native": "saefast.ops.native",
             "saefast.checkpoint": "saefast.models.checkpoint", "saefast.metrics": "saefast.eval.metrics",
             "saefast.class_metrics": "saefast.eval.class_metrics", "saefast.sharpen_tasks": "saefast.sharpen.tasks"}
    for old, new in pairs.items():
        assert importlib.import_module(old) is importlib.import_module(new), old


def test_every_public_function_class_and_method_has_a_docstring():
    """Across every module of saefast (and the Triton kernels): nothing public without a docstring."""
    root = Path(__file__).resolve().parents[1]
    missing = []

    def visit(path: Path, body: list[ast.stmt], prefix: str = "") -> None:
        for node in body:
            definition = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if definition and not node.name.startswith("_"):
                if ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(root)}:{node.lineno} {prefix}{node.name}")
                if isinstance(node, ast.ClassDef):
                    visit(path, node.body, f"{prefix}{node.name}.")

    for package in (root / "saefast", root / "kernels" / "saefast_triton"):
        for path in sorted(package.rglob("*.py")):
            visit(path, ast.parse(path.read_text()).body)
    assert not missing, missing
