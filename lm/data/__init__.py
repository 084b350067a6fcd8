"""Data: sources, tokenization, and the pipeline that turns them into global batches."""
