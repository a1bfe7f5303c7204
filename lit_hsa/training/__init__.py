"""Training: the LightningModule (``module``), callbacks, parallelism (compile → activation checkpointing → FSDP2,
``parallel``), FLOPs for MFU, and run assembly from a config (``run``)."""
