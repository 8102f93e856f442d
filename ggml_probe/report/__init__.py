"""Turning results into terminal tables, files and plots."""
