"""Test helpers that start real services (sshd) for integration tests."""
