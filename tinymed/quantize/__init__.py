"""tinymed.quantize stage."""
