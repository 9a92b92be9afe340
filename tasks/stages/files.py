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
TRAINING_LOG_FILE = "training_log.json"
TENSORBOARD_DIR = "tensorboard"
# pretrain
AUTOENCODER_FILE = "autoencoder.keras"
RECONSTRUCTION_FILE = "reconstruction.png"
# The classifiers by model name (the name every table, curve and registry entry uses) -> the stage that trains
# it; "probe" only with FinetuneConfig.linear_probe. Each writes `<model>.keras` and `<model>_training_log.json`.
MODEL_STAGES: dict[str, str] = {"softmax": "baselines", "ann": "baselines", "pretrained": "finetune",
                                "probe": "finetune"}
# Model name -> (stage, file inside that stage's artifact directory).
MODEL_FILES: dict[str, tuple[str, str]] = {model: (stage, f"{model}.keras") for model, stage in MODEL_STAGES.items()}
# Model name -> (stage, file) of its per-epoch rows.
TRAINING_LOG_FILES: dict[str, tuple[str, str]] = {
    model: (stage, f"{model}_{TRAINING_LOG_FILE}") for model, stage in MODEL_STAGES.items()}
# Fine-tune artifacts written before the files took their model's name: the registry still finds a champion there.
OLD_MODEL_FILES: dict[str, str] = {"pretrained": "finetuned.keras"}
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
