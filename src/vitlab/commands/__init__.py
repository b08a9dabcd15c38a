"""One module per ``vitlab`` subcommand, each with ``add_parser(subparsers)``."""
