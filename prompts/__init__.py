"""Prompt templates shipped with kb (package data); a file of the same name in the kb home overrides one."""
