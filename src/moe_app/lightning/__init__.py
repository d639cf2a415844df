"""moe_app.lightning."""
