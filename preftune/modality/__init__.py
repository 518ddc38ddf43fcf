"""What differs between text and images: reading rows, collation, the log-prob module, policy preparation and the
reference's cache key."""
