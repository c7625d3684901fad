"""Data, prompts, the SFT stage, stages and the pipeline, evaluation; the top of the import ladder."""
