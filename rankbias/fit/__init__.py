"""The rank law fitted to a store's runs, and predictions from it."""
