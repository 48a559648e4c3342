"""pairfree: train image captioners without human-paired image-caption data."""

__version__ = "0.1.0"
