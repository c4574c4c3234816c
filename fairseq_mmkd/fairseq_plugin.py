"""Registers the plugin's fairseq components (task, model, criterion) by importing them."""
