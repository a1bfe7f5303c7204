"""Evaluation: RULER-style retrieval accuracy by task × length × depth, perplexity by position, plots."""
