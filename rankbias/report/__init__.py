"""Figures, the static page, the explorer and its server."""
