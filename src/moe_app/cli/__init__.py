"""moe_app.cli.main."""
