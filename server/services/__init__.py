"""Business logic between the routes and the engine/store: prompts, adapters, recording, auth."""
