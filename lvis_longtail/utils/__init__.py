"""Small helpers shared by the whole package (one home per job)."""
