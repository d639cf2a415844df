"""Small shared helpers (no lightning imports)."""
