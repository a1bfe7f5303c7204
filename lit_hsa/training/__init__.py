"""Training: the LightningModule (``module``), callbacks, parallelism (activation checkpointing → compile → FSDP2,
``parallel``), FLOPs for MFU, and run assembly from a config (``run``)."""
