"""``python -m gpunn``: the same as the ``gpunn`` command."""

from gpunn.cli import main

if __name__ == "__main__":
    main(prog_name="gpunn")
