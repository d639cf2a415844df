"""moe_app.core.pesc."""
