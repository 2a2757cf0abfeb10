"""One module per architecture family: its `Family` data and its config.json reading/writing."""
