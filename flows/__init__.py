"""Everything Prefect-aware: the task wrappers, the flow and the command line."""

import logging
import os

# Imported first: it reads whether the user chose TensorFlow's log level before the default below is set.
from flows.tf_logs import hide_tf_logs, not_retracing

# Route the plain `tasks` package's log records into Prefect's run logs, and keep TensorFlow's C++ chatter down.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary local API migrates a new database on first start, which takes longer than Prefect's 20 s default
# on a busy two-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# In every process that runs the pipeline's code, Dask workers included.
logging.getLogger("tensorflow").addFilter(not_retracing)
if "PREFECT__FLOW_RUN_ID" in os.environ:  # a flow-run process that a Prefect worker started for a deployment
    hide_tf_logs()
