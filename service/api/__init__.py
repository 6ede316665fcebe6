"""HTTP handlers: thin, they validate input and call the store or the turn producer."""
