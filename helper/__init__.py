"""l3ptp helper package."""
