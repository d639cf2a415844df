"""Training layer (Lightning): modules that own the loss and logging and call the core."""
