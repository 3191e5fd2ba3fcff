"""tinymed.models stage."""
