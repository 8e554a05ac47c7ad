"""l3ptp controller package."""
