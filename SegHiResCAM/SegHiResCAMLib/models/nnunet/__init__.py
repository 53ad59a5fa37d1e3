"""models/nnunet."""
