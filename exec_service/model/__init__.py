"""Exec model: parallel layers, collectives, the generic decoder, strict shard loading."""
