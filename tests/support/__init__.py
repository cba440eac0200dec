"""Helpers shared by the tests of several components (import as ``tests.support.<module>``)."""
