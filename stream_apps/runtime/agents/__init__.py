"""The worker's Faust agents, one module each, built by module-level functions from an :class:`.AgentContext`."""
