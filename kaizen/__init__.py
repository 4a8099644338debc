"""The composition root: the ``kaizen`` command, assembled from the server's subcommands
(:mod:`server.cli`) and the trainer's (:mod:`trainer.cli`). Nothing below imports this package;
it is the one place that sees both halves."""
