"""The paper's three experiments as tasks: config dataclass + run(config) -> result."""
