"""models/torchscript."""
