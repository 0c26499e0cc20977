"""A call's context on its way from the webhook that learns it to the stream that needs it:
the mapping and byte budget, and Twilio's TwiML (:mod:`.twiml`); the store that keeps it
between webhook and stream (:mod:`.store`)."""
