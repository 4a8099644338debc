#!/bin/sh
# The same start-up steps as `make serve`: prepare the model (no-op when done), migrate, serve.
set -eu
kaizen model prepare
kaizen db upgrade
exec "$@"
