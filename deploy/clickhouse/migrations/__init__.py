"""ClickHouse schema migrations, shipped as package data (plain numbered SQL files)."""
