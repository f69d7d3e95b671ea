"""Escape-regression suite: one test per known Kata advisory and per container-escape class."""
