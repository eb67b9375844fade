"""Inference around the model: how inputs are grouped into batches (more to move here from model.py)."""
