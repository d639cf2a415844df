"""moe_app.lightning.strategies."""
