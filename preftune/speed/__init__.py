"""Mechanisms that make training faster or lighter without changing what it computes."""
