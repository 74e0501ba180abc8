"""The score-SDE toolkit's own layers (utils, losses, datasets, training, evaluation, ...).

The design's five modules stay top-level as in the reference (``sde_lib``, ``models``,
``samplers``, ``likelihood``, ``configs``); everything else lives here, so that installing
the toolkit takes over no name that other code owns (``datasets``, ``utils``, ``main``).
"""
