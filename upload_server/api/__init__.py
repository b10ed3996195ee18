"""HTTP resources: thin Falcon responders that parse a request and call `service.SessionService`."""
