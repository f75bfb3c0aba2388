"""Demo assets: the Nimbus Gear support knowledge base used by examples and tests."""
