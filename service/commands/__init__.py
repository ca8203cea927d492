"""One module per `flowie` sub-command: add_arguments(parser) and run(args)."""
