"""Evaluation protocols beyond classification: the measures, written from their definitions."""
