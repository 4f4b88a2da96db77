"""The OpenAI-compatible HTTP server (`albireo serve`)."""
