"""featurepipe's adapters at Feast's edge: the classes ``feature_store.yaml`` names."""
