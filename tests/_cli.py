"""Running the command line in-process, for tests."""

from s2split.cli.parser import main


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``s2split ARGV``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str, *needles: str) -> str:
    """The single line of ``err``, asserted free of tracebacks and holding ``needles``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
