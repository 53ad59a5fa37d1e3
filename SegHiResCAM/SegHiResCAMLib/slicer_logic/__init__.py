"""slicer_logic."""
