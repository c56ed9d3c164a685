"""pprl: distributed training and batch inference for privacy-preserving face analytics (PPRL-VGAN)."""

__version__ = "0.1.0"
