"""tinymed.analysis stage."""
