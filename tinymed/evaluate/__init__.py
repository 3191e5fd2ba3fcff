"""tinymed.evaluate stage."""
