"""The HTTP layer: thin routes over the services, one error shape, auth dependencies."""
