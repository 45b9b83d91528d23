"""Online store: Redis in Feast's layout."""
