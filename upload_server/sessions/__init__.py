"""Session state: the record, its live view (the Manager dict) and its durable store."""
