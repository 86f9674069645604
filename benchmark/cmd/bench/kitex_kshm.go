package main

// kitexKshmTransports: the echo service over kshm in each wake-up mode
// (filled in when the transport's option.go lands).
func kitexKshmTransports() []transportDef { return nil }
