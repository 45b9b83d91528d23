"""Streaming path (minimal): new events -> the same aggregate SQL -> online store."""
