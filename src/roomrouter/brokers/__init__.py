"""Broker backends."""
