"""tinymed.train stage."""
