"""After go-live: the prediction log (`store`), pseudonymous keys that join late labels (`keys`) and a
background writer that keeps logging off the request path (`writer`)."""
