"""The toolkit's command line as a script: ``python main.py --config digits --mode train ...``.

The CLI lives in :mod:`score_sde.cli` (installed as the ``score-sde`` command, which runs from
any folder); this file is not installed, so that no module named ``main`` is taken over.
"""

from score_sde.cli import run

if __name__ == "__main__":
    run()
