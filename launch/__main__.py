"""`python -m launch <command> ...`: how geoprime jobs start.

Commands: run (torchrun / sbatch), k8s (Kubernetes manifests), study (the grid),
compare (the comparison table), demo (the whole built-in study on the synthetic world).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("launch.torchrun", "build and run the torchrun command (single or multi-node), or print an sbatch script"),
    "k8s": ("launch.k8s", "render Kubernetes manifests (job | jobset | pytorchjob)"),
    "study": ("launch.study", "run a study grid: pre-trainings, then fine-tuning from each"),
    "compare": ("launch.compare", "comparison table + bar chart of a study, from MLflow"),
    "demo": ("launch.demo", "build the synthetic shards, run the built-in study, print the table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m launch <command> [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
