"""Classifying new images with the champion model; imports ml and data."""
