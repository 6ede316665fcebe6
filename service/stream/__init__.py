"""The turn producer: one chat turn from rules to finalization, as a stream of typed events."""
