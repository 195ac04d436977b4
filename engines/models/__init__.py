"""Model-family decoders, preprocessing and family auto-detection."""
