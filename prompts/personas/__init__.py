"""Personas: preset system prompts picked with --persona NAME."""
