"""ddaepp: DDAE++ on LightningDiT as a reproducible pipeline (see the repository README)."""

__version__ = "0.1.0"
