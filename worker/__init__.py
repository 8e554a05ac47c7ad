"""l3ptp worker package."""
