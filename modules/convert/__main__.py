"""Run the dataset CLI: ``python -m modules.convert {synth,asap,ellipse,csv} ...`` (see ``cli.py``)."""
from modules.convert.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
