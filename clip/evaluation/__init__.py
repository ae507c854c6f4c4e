"""Evaluation of CLIP models: zero-shot classification with prompt ensembles, image-text retrieval,
linear probes, and the hook the trainer calls during training. Datasets are read from local files only."""

from .config import EvalConfig, RetrievalDatasetConfig, ZeroShotDatasetConfig
from .datasets import CIFARDataset, ClassificationData, ImageFolderDataset, load_classification_data
from .during_training import run_evaluations, should_evaluate
from .linear_probe import LinearProbeResult, extract_features, fit_logistic_regression, run_linear_probe, select_l2
from .results import ZeroShotResult, format_table, save_confusion_png
from .retrieval import RetrievalResult, evaluate_retrieval, retrieval_ranks
from .retrieval_data import RetrievalData, load_retrieval_data, read_caption_manifest, read_karpathy_json
from .templates import DEFAULT_TEMPLATES, builtin_templates, load_classnames, load_templates
from .zeroshot import build_zeroshot_classifier, evaluate_zeroshot, zeroshot_classify, zeroshot_classify_images

__all__ = [
    "CIFARDataset",
    "ClassificationData",
    "DEFAULT_TEMPLATES",
    "EvalConfig",
    "ImageFolderDataset",
    "LinearProbeResult",
    "RetrievalData",
    "RetrievalDatasetConfig",
    "RetrievalResult",
    "ZeroShotDatasetConfig",
    "ZeroShotResult",
    "build_zeroshot_classifier",
    "builtin_templates",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "extract_features",
    "fit_logistic_regression",
    "format_table",
    "load_classification_data",
    "load_classnames",
    "load_retrieval_data",
    "load_templates",
    "read_caption_manifest",
    "read_karpathy_json",
    "retrieval_ranks",
    "run_evaluations",
    "run_linear_probe",
    "save_confusion_png",
    "select_l2",
    "should_evaluate",
    "zeroshot_classify",
    "zeroshot_classify_images",
]
