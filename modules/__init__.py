"""LoRA essay scoring: the modules behind main_pipeline.py and self_consistency.py (README lists each one's job)."""
