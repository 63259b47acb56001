"""``python3 -m s2split.hw SUBCOMMAND``: the ``s2split hw`` commands without the
rest of the CLI, whose parser needs numpy. This is how ``hw run`` runs on a
bare Python (e.g. in a minimal arm64 VM): ``python3 -m s2split.hw run ...
--json FILE``."""

import sys

from ..plumbing.console import error_boundary, run_command
from ..selftest.options import Parser
from .cli import register


def main(argv=None) -> int:
    """One error boundary around everything, as ``s2split``'s own main."""
    rest = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        parser = Parser(prog="s2split", description="s2split's real-KVM harness")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
        register(sub)
        args = parser.parse_args(["hw", *rest])
        return run_command(args, "hw")
    return error_boundary("s2split hw", run)


if __name__ == "__main__":
    sys.exit(main())
