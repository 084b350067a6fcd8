"""Import and export of checkpoints in other formats (Hugging Face)."""
