"""Transports: encode the producer's events for one wire format; detect disconnects. No rules."""
