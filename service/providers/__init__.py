"""Providers: the only code that speaks HTTP to model vendors.

Each turns its vendor's stream into ``Chunk``s and its errors into ``UpstreamError`` codes.
"""
