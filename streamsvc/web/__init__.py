"""The HTTP side of the stream port: the front that reads each connection's first request
(:mod:`.front`), Twilio's voice webhook and status callback (:mod:`.webhooks`), and ACS's
Event Grid deliveries and callbacks (:mod:`.acs_events`)."""
