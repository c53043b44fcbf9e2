"""pied's workers: the scheduler, executor and memory-manager actors, and what they share."""

__version__ = "0.1.0"  # the package version (pied re-exports it)
