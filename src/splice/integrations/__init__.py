"""Integrations with training frameworks (imported on demand: `splice.integrations.hf_trainer`)."""
