"""Text and task data that ship with bitplan or in installed packages (nothing is downloaded)."""

from bitplan.data.calibration import calibration_samples, calibration_texts, fingerprint
from bitplan.data.heldout import heldout_fingerprint, heldout_samples, heldout_texts
from bitplan.data.offline_tasks import DEFAULT_TASKS, OFFLINE_TASKS, TASKS_DIR

__all__ = [
    "DEFAULT_TASKS",
    "OFFLINE_TASKS",
    "TASKS_DIR",
    "calibration_samples",
    "calibration_texts",
    "fingerprint",
    "heldout_fingerprint",
    "heldout_samples",
    "heldout_texts",
]
