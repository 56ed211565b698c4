"""Headoni ticket intake API."""
