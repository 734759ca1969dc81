"""Command groups of the ``gateway`` CLI, one module each; helpers they share are in :mod:`gateway.commands.common`."""
