"""moe_app.core.models."""
