"""moe_app.lightning.data."""
