"""MLflow's usage telemetry (network calls to MLflow's servers) is off in every process that tracks,
unless the user turns it on: geoprime reaches no network it was not pointed at."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = ("import trainer.tracking.client, os; "  # the client module is what every tracking process imports first
         "from mlflow.telemetry.client import get_telemetry_client; "
         "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], get_telemetry_client() is None)")


def _run(**extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                          check=True).stdout.split()


def test_telemetry_is_off_unless_the_user_turns_it_on():
    assert _run() == ["true", "True"]  # no telemetry client: nothing is sent
    assert _run(MLFLOW_DISABLE_TELEMETRY="false")[0] == "false"  # the user's choice stands
