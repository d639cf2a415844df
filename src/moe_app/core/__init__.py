"""moe_app.core."""
