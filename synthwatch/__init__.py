"""synthwatch: early warning for new synthetic drugs (shared glue: settings, CLI, embedded runtime)."""
