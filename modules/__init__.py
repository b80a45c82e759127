"""LoRA essay scoring: data, models, losses, trainer, scoring, sampling, voting, plots, converters."""
