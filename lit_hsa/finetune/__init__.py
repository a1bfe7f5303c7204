"""LoRA fine-tuning's checkpoints: the frozen base (by fingerprint), adapter checks, and ``merge`` (the adapters
themselves are modules: ``lit_hsa.model.lora``)."""
