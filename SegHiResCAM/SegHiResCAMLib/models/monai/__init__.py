"""models/monai."""
