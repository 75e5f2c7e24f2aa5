"""Issue 5: crash safety, restart recovery, concurrency, hostile input, secrets, bounds."""
