"""l3ptp ipc package."""
