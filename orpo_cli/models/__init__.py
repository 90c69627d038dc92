"""Models: loading a base model and tokenizer, the built-in models, loading a tuned run or export for inference."""
