"""tinymed.serve stage."""
