"""Rewrite the Kubernetes golden files after a deliberate change: python tests/golden/regenerate.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.k8s import KINDS, render, to_yaml  # noqa: E402
from test_launch_k8s import typical_job  # noqa: E402

for kind in KINDS:
    path = Path(__file__).parent / f"k8s_{kind}.yaml"
    path.write_text(to_yaml(render(kind, typical_job())))
    print("wrote", path)
