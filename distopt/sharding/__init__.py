"""What each rank holds of each parameter, and (for matrix algorithms) who owns what."""
