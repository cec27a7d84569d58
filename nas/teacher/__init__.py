"""A trained U-Net as a starting point: its architecture read from any saved folder (arch), the
plan of which weights a student takes from it (plan) and the copy itself (inherit)."""
