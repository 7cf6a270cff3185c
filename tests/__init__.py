"""Tests for joblet-persist (run with trial).

Hypothesis runs with a deterministic profile so that a failure reproduces; set
HYPOTHESIS_PROFILE=long for longer exploratory runs.
"""

import os
import warnings

# Reactor-only methods assert their thread in tests (joblet_persist/threads.py); set before
# any joblet_persist module is imported, and inherited by the twistd processes tests spawn.
os.environ.setdefault("JOBLET_PERSIST_CHECK_THREADS", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.register_profile("long", deadline=None, max_examples=5000, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

warnings.simplefilter("error")
# Third-party modules that warn at import time on new Pythons are not ours to fix.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(klein|werkzeug|treq|incremental)\b.*")
