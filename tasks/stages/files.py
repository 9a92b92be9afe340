"""The name of every file an artifact holds, stage by stage; any module may import it, it imports nothing."""

from __future__ import annotations

# download
DATA_FILE = "data.npz"
# validate
VALIDATION_FILE = "validation.json"
DOCS_DIR = "data_docs"
DOCS_INDEX = f"{DOCS_DIR}/index.html"
# Training stages (pretrain, finetune, baselines, a study cell): per-epoch rows, and the TensorBoard event files,
# one run directory per model.
TRAINING_LOG_FILE = "history.json"
TENSORBOARD_DIR = "tensorboard"
# pretrain
AUTOENCODER_FILE = "autoencoder.keras"
RECONSTRUCTION_FILE = "reconstruction.png"
# Model name -> (stage, file inside that stage's artifact directory); "probe" only with FinetuneConfig.linear_probe.
MODEL_FILES: dict[str, tuple[str, str]] = {
    "softmax": ("baselines", "softmax.keras"),
    "ann": ("baselines", "ann.keras"),
    "pretrained": ("finetune", "finetuned.keras"),
    "probe": ("finetune", "probe.keras"),
}
# Model name -> (stage, file) of its per-epoch rows.
TRAINING_LOG_FILES: dict[str, tuple[str, str]] = {
    "softmax": ("baselines", "softmax_history.json"),
    "ann": ("baselines", "ann_history.json"),
    "pretrained": ("finetune", TRAINING_LOG_FILE),
    "probe": ("finetune", "probe_history.json"),
}
# evaluate
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
# The stage report, and the run report and the study's report beside it: <REPORT_NAME>.md and .html
REPORT_NAME = "report"
ACCURACY_FILE = "accuracy.json"
# Sections of the report stage's blocks that the run report replaces (the artifacts) or moves to its end.
STAGES_HEADING = "Stage artifacts"
CONFIG_HEADING = "Configuration"
# a study cell
CELL_MODEL_FILE = "model.keras"
CELL_PREDICTIONS_FILE = "predictions.npy"
CELL_RESULT_FILE = "cell.json"
# the study's report
STUDY_FIGURE_FILE = "accuracy_by_labels.png"
STUDY_RESULTS_FILE = "study.json"
