"""Hugging Face interoperability: import dense checkpoints (``convert``), export lit-hsa models (``export``)."""
