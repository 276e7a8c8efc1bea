"""`python -m omnidaemon ...` runs the command line."""

from omnidaemon.cli import main

if __name__ == "__main__":
    main()
