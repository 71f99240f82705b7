"""The names of the files in a run folder and a sweep folder: one definition each, importable without torch.

The library's writers (`searches/`, `dense.py`, `sweeps/`), its readers (`plotting.py`, `figures.py`) and
the command line all take the names from here, so `maskforge plot RUN` can find a run's files without
loading the search (and torch). README.md ("What a search does") and docs/SWEEP.md list them for users.
"""

# A search's (or dense baseline's) run folder.
ARTIFACT_NAME = "artifact.safetensors"  # written last: its presence marks a finished search
CONFIG_NAME = "config.json"  # the arguments
METRICS_NAME = "metrics.jsonl"  # one record per finished epoch
METRICS_CSV_NAME = "metrics.csv"  # the same records as a table
TENSORBOARD_DIR = "tensorboard"  # event files, with --tensorboard
CHECKPOINT_NAME = "checkpoint.safetensors"  # while the search runs
LOCK_NAME = "search.lock"  # while a search runs in the folder
PREVIOUS_PREFIX = "previous-"  # previous-N/: what a replaced or extended run held
DENSE_RESULT_NAME = "dense.json"  # a dense baseline's result, written last
CURVES_STEM = "curves"  # `maskforge plot RUN`: curves.png and curves.svg

# A sweep folder.
SWEEP_FILE = "sweep.json"  # every grid run in the folder
RESULTS_FILE = "results.csv"  # one row per point
STATUS_FILE = "point.json"  # per point: wall time over every attempt, attempts, last error
