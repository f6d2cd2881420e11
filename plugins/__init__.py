"""Plugins shipped with the package; each registers itself through the ``infra.plugins`` entry points."""
