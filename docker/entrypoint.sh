#!/bin/sh
# geoprime image entry point: Hydra overrides (or nothing) run `python -m trainer`; a command
# such as torchrun, python, bash or `python -m launch ...` runs as given.
set -e
case "${1:-}" in
  "" | -* | *=*) exec python -m trainer "$@" ;;
  *) exec "$@" ;;
esac
