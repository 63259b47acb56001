"""``python3 -m s2split.hw SUBCOMMAND``: the ``s2split hw`` commands without the
rest of the CLI, whose parser needs numpy. This is how ``hw run`` runs on a
bare Python (e.g. in a minimal arm64 VM): ``python3 -m s2split.hw run ...
--json FILE``."""

import sys

from ..cli import Parser
from ..errors import S2Error
from .cli import register


def main(argv=None) -> int:
    parser = Parser(prog="s2split", description="s2split's real-KVM harness")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    register(sub)
    args = parser.parse_args(["hw", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except S2Error as e:
        sys.stderr.write(f"s2split hw: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("s2split: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
