"""Running the command line in-process, for tests."""

from s2split.cli import main


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``s2split ARGV``."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
